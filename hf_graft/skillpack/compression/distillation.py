"""Scale distillation: the continuous values a SkillPack stores anyway, trained to match the tuned model.

BitDelta (Liu et al., 2024) fixes the signs of a delta and trains its per-matrix scales on the
fine-tuned model's outputs; that one step recovers most of what the 1-bit rounding lost. Here it
applies to every format: once the integer codes are fixed, the fp16 group scales and zeros of
quantized deltas and low-rank factors, the kept values of sparse deltas and the fp16 norm and bias
deltas are trained with Adam for a few hundred steps on the KL divergence between the tuned
model's next-token distributions and those of the base with the decoded deltas added, on the
calibration batches. The file keeps the same codes and the same number of bytes.

Each value is trained relative to the size of its tensor (``value = initial + scale * theta``,
``scale`` the tensor's mean magnitude), so one learning rate suits scales of every magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import HfGraftError
from .bitpack import unpack_bits
from .formats import CompressedDelta
from .prune import SparseDelta
from .quantize import MixedPrecisionFactor, QuantizedMatrix

__all__ = ["distill_block", "distill_scales"]

#: Teacher distributions are kept in memory up to this many bytes; beyond, the tuned model is rerun.
TEACHER_CACHE_BYTES = 256 << 20


class _Trainable:
    """One stored delta with its continuous values as trainable offsets over fixed integer codes."""

    def __init__(self, packed: CompressedDelta):
        self.packed = packed
        self.values: list[torch.Tensor] = []  # the stored fp16 values, in float32
        self.codes: dict[int, torch.Tensor] = {}
        if packed.kind in ("quant", "lowrank"):
            matrices = ([packed.quant] if packed.quant is not None else []) + (
                list(packed.a.blocks) + list(packed.b.blocks) if packed.a is not None else []
            )
            for matrix in matrices:
                rows, cols = matrix.shape
                self.codes[id(matrix)] = unpack_bits(matrix.packed, matrix.bits, rows * cols).reshape(rows, cols).float()
                self.values += [matrix.scales.float(), matrix.zeros.float()]
        elif packed.kind == "sparse":
            self.values = [packed.sparse.values.float()]
        else:
            self.values = [packed.dense.float()]
        self.references = [value.abs().mean().clamp_min(1e-12) for value in self.values]
        self.offsets = [torch.zeros_like(value, requires_grad=True) for value in self.values]

    def current(self) -> list[torch.Tensor]:
        return [value + reference * offset for value, reference, offset in zip(self.values, self.references, self.offsets)]

    def delta(self) -> torch.Tensor:
        """The decoded delta (float32), differentiable in the offsets."""
        values = iter(self.current())
        packed = self.packed
        if packed.kind == "sparse":
            sparse = packed.sparse
            dense = torch.zeros(sparse.numel, dtype=torch.float32)
            positions = sparse.indices.long() if sparse.indices is not None else unpack_bits(sparse.bitmap, 1, sparse.numel).bool().nonzero()[:, 0]
            return dense.index_put((positions,), next(values)).reshape(sparse.shape)
        if packed.kind == "dense_fp16":
            return next(values)
        result = self._matrix(packed.quant, values) if packed.quant is not None else None
        if packed.a is not None:
            a = torch.cat([self._matrix(block, values) for block in packed.a.blocks], dim=1)
            b = torch.cat([self._matrix(block, values) for block in packed.b.blocks], dim=1)
            product = b @ a.T
            result = product if result is None else result + product
        return result

    def _matrix(self, matrix: QuantizedMatrix, values) -> torch.Tensor:
        scales, zeros = next(values), next(values)
        rows = matrix.shape[0]
        expand = lambda grid: grid.repeat_interleave(matrix.group_size, dim=0)[:rows]  # noqa: E731
        return self.codes[id(matrix)] * expand(scales) + expand(zeros)

    def stored(self) -> CompressedDelta:
        """The delta with its trained values rounded to fp16, codes unchanged."""
        values = iter([value.detach().clamp(-65504, 65504).half() for value in self.current()])
        packed = self.packed
        if packed.kind == "sparse":
            old = packed.sparse
            return CompressedDelta("sparse", packed.shape, sparse=SparseDelta(old.shape, next(values), old.indices, old.bitmap))
        if packed.kind == "dense_fp16":
            return CompressedDelta("dense_fp16", packed.shape, dense=next(values))

        def rebuilt(matrix: QuantizedMatrix) -> QuantizedMatrix:
            scales, zeros = next(values), next(values)
            return QuantizedMatrix(matrix.packed, scales, zeros, matrix.bits, matrix.shape, matrix.group_size)

        quant = rebuilt(packed.quant) if packed.quant is not None else None
        a = b = None
        if packed.a is not None:
            a = MixedPrecisionFactor(tuple(rebuilt(block) for block in packed.a.blocks))
            b = MixedPrecisionFactor(tuple(rebuilt(block) for block in packed.b.blocks))
        return CompressedDelta(packed.kind, packed.shape, a=a, b=b, quant=quant)


def distill_scales(
    base: nn.Module,
    tuned: nn.Module,
    deltas: Mapping[str, CompressedDelta],
    batches: Sequence[Any],
    *,
    steps: int = 200,
    learning_rate: float = 2e-3,
    progress: bool = True,
) -> tuple[dict[str, CompressedDelta], list[float]]:
    """Train the continuous values of ``deltas`` (``{"module.part": delta}``) so ``base`` + deltas matches ``tuned``.

    The loss is ``KL(tuned || base + deltas)`` of next-token distributions over every position of
    the calibration ``batches`` (``input_ids`` tensors or dicts of model inputs; with ``labels``,
    only the positions that predict a supervised token), one batch per step,
    Adam with cosine decay. Integer codes, positions and shapes never change, so neither do the
    bytes. Returns the trained deltas and the loss of each step. Neither model is modified.
    """
    if steps < 1:
        raise HfGraftError(f"distill_scales needs steps >= 1, got {steps}.")
    if not batches:
        raise HfGraftError("Scale distillation needs calibration batches.")
    parameters = dict(base.named_parameters())
    missing = sorted(name for name in deltas if name not in parameters)
    if missing:
        raise HfGraftError(f"The base model has no parameter {missing[0]!r} to distill a delta for.")
    trainables = {name: _Trainable(delta) for name, delta in deltas.items()}
    inputs = [dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch} for batch in batches]
    teacher = _teacher(tuned, inputs)

    def loss_of(step: int) -> torch.Tensor:
        index = step % len(inputs)
        batch = inputs[index]
        target = teacher[index] if teacher is not None else _log_probs(tuned, batch)
        replaced = {
            name: (parameters[name].detach().float() + trainable.delta()).to(parameters[name].dtype)
            for name, trainable in trainables.items()
        }
        model_inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = torch.func.functional_call(base, replaced, args=(), kwargs=model_inputs).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        per_position = torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="none").sum(-1)
        mask = _positions(batch)
        return (per_position * mask).sum() / mask.sum().clamp_min(1)

    losses = _train(base, trainables, loss_of, steps, learning_rate, progress, "Distilling SkillPack scales")
    return {name: trainable.stored() for name, trainable in trainables.items()}, losses


@torch.no_grad()
def _log_probs(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return torch.log_softmax(model(**inputs).logits.float(), dim=-1)


def _positions(batch: Mapping[str, Any]) -> torch.Tensor:
    """Which positions' next-token distributions to match: every attended one, or with ``labels``
    (-100 where not supervised, as for SFT) those that predict a supervised token: the skill itself."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).float()
    labels = batch.get("labels")
    if labels is not None:
        supervised = torch.zeros_like(mask)
        supervised[:, :-1] = (labels[:, 1:] != -100).float()
        mask = mask * supervised
    return mask


def _teacher(tuned: nn.Module, inputs: list) -> list | None:
    """The tuned model's log-probabilities of every batch, when they fit :data:`TEACHER_CACHE_BYTES`."""
    vocab = tuned.get_output_embeddings().weight.shape[0] if tuned.get_output_embeddings() is not None else 0
    size = sum(4 * batch["input_ids"].numel() * vocab for batch in inputs)
    if not vocab or size > TEACHER_CACHE_BYTES:
        return None
    was_training = tuned.training
    tuned.eval()
    try:
        return [_log_probs(tuned, batch) for batch in inputs]
    finally:
        tuned.train(was_training)



def distill_block(
    block: nn.Module,
    base_parameters: Mapping[str, torch.Tensor],
    deltas: Mapping[str, CompressedDelta],
    inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
    targets: Sequence[torch.Tensor],
    *,
    steps: int = 200,
    learning_rate: float = 2e-3,
    progress: bool = True,
) -> tuple[dict[str, CompressedDelta], list[float]]:
    """Train the continuous values of one decoder block's ``deltas`` so its outputs match ``targets``.

    ``deltas`` and ``base_parameters`` are keyed by the block's own parameter names; ``inputs[i]``
    is ``(hidden_states, args, kwargs)`` of calibration batch ``i`` as the block is called, and
    ``targets[i]`` the tuned model's hidden states after the block. The loss is the squared error
    relative to the targets' energy, one batch per step (Adam, cosine decay), as
    :func:`distill_scales` trains. ``block`` is not modified.
    """
    if steps < 1:
        raise HfGraftError(f"distill_block needs steps >= 1, got {steps}.")
    if not inputs or len(inputs) != len(targets):
        raise HfGraftError("distill_block needs one target per calibration batch.")
    missing = sorted(name for name in deltas if name not in base_parameters)
    if missing:
        raise HfGraftError(f"The block has no parameter {missing[0]!r} to distill a delta for.")
    trainables = {name: _Trainable(delta) for name, delta in deltas.items()}

    def loss_of(step: int) -> torch.Tensor:
        hidden, args, kwargs = inputs[step % len(inputs)]
        target = targets[step % len(inputs)]
        replaced = {
            name: base_parameters[name].detach().float() + trainable.delta().to(base_parameters[name].device)
            for name, trainable in trainables.items()
        }
        output = torch.func.functional_call(block, replaced, args=(hidden, *args), kwargs=kwargs)
        output = output[0] if isinstance(output, tuple) else output
        return (output.float() - target).square().sum() / target.square().sum().clamp_min(1e-30)

    losses = _train(block, trainables, loss_of, steps, learning_rate, progress, "Distilling the block's scales")
    return {name: trainable.stored() for name, trainable in trainables.items()}, losses


def _train(module: nn.Module, trainables: Mapping[str, _Trainable], loss_of, steps: int, learning_rate: float, progress: bool,
           description: str) -> list[float]:
    """``steps`` steps of Adam (cosine decay) on the trainables' offsets, ``module`` in eval mode
    (no dropout) and given back its mode after; ``loss_of(step)`` gives each step's loss."""
    offsets = [offset for trainable in trainables.values() for offset in trainable.offsets]
    optimizer = torch.optim.Adam(offsets, lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    was_training = module.training
    module.eval()
    try:
        for step in tqdm(range(steps), desc=description, disable=not progress):
            loss = loss_of(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    finally:
        module.train(was_training)
    return losses
