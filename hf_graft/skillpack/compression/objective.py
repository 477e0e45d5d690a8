"""What a delta's compression error costs the model: the objective every SkillPack candidate is measured by.

A module computes ``y = W x``; storing ``dW`` with an error ``E`` moves its outputs by ``E x``, and
the model's loss by about ``1/2 E[(E x)^T G (E x)]`` with ``G`` the curvature of the loss in ``y``
(the Fisher ``E[g g^T]`` of the output gradients ``g``). With the Kronecker approximation of
K-FAC (Martens & Grosse, 2015), ``E[x x^T]`` and ``E[g g^T]`` taken apart, and ``G`` kept to its
diagonal, the cost of ``E`` is

    ``sum_i f_i (E H E^T)_ii``,   ``H = E[x x^T]`` (inputs),  ``f = E[g * g]`` (outputs).

``H`` alone is GPTQ's objective (the change of one layer's output on real inputs); ``f`` weighs
modules against each other by how much the model's loss reacts to their outputs, so bytes go
where they change the model's behaviour most, not where the weight-space error is largest. For
an embedding the "input" is a one-hot token: ``f`` is then the frequency of each token and ``H``
the diagonal of the output gradients' second moment.

:func:`collect_statistics` gathers both in one pass of forward and backward over the
calibration batches (next-token loss on the batches themselves, or on their ``labels``: give
the skill's supervised answers to weigh what the skill needs), through hooks, on the tuned model. Without calibration data every ``H`` is the identity and every ``f`` is one: the plain
Frobenius error.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ...errors import HfGraftError

__all__ = ["ModuleStatistics", "StatisticsRecorder", "collect_statistics", "squared_norm"]

#: Tokens the calibration never shows still get this share of the mean token frequency, so an
#: embedding row the calibration misses is cheap to lose but never free.
TOKEN_FLOOR = 0.01


#: Entries :func:`squared_norm` takes in one float32 dot product.
NORM_BLOCK_ENTRIES = 1 << 16

#: Bytes of float32 rows :meth:`ModuleStatistics.cost` works on at a time.
COST_CHUNK_BYTES = 64 << 20


def squared_norm(tensor: torch.Tensor) -> float:
    """``||tensor||_F^2``: float32 dot products over blocks of about 65536 entries, summed in float64
    (relative error about 1e-7; no full-size temporary)."""
    if tensor.dim() == 0:
        return float(tensor.double() ** 2)
    step = max(1, NORM_BLOCK_ENTRIES // max(1, tensor[0].numel()))
    total = 0.0
    for block in tensor.split(step):
        flat = block.reshape(-1).float()
        total += float(torch.dot(flat, flat))
    return total


@dataclass(frozen=True)
class ModuleStatistics:
    """Second moments of one module's inputs and output gradients, in the delta's own layout.

    ``hessian`` is ``[cols, cols]`` and ``row_weights`` ``[rows]`` for a delta of shape
    ``[rows, cols]``; a 1-D ``hessian`` ``[cols]`` is the diagonal of one whose inputs are
    uncorrelated (data-free, embeddings), kept without its zeros. With ``transposed`` (GPT-2's ``Conv1D``, weight ``[in, out]``) the delta is
    transposed to ``[out, in]`` before they apply.
    """

    hessian: torch.Tensor
    row_weights: torch.Tensor
    transposed: bool = False
    #: Further uses of the same weight (a tied embedding and head): their costs add up.
    also: tuple = ()

    def cost(self, error: torch.Tensor) -> float:
        """``sum_i f_i (E H E^T)_ii`` of an error ``E`` in the delta's layout (plus that of every ``also``)."""
        matrix = error.T if self.transposed else error
        own, step = 0.0, max(1, COST_CHUNK_BYTES // (4 * matrix.shape[1]))
        for start in range(0, matrix.shape[0], step):  # in row blocks: no full-size temporaries
            chunk, weights = matrix[start:start + step].float(), self.row_weights[start:start + step]
            if self.is_diagonal:  # data-free and embeddings: no input correlations to weigh
                own += float((chunk.square() @ self.diagonal * weights).sum())
            else:
                own += float((((chunk @ self.hessian) * chunk).sum(dim=1) * weights).sum())
        return own + sum(other.cost(error) for other in self.also)

    def oriented(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` as ``[out, in]`` (the layout ``hessian`` and ``row_weights`` index)."""
        return delta.T if self.transposed else delta

    def rows(self, start: int, stop: int) -> ModuleStatistics:
        """These statistics for rows ``start:stop`` of the delta alone (its cost is the sum over row blocks)."""
        if self.transposed:
            raise HfGraftError("ModuleStatistics.rows: a transposed (Conv1D) delta's rows are its inputs; its cost does not split by them.")
        return ModuleStatistics(self.hessian, self.row_weights[start:stop], False, tuple(o.rows(start, stop) for o in self.also))

    def to(self, device) -> ModuleStatistics:
        """These statistics on ``device``."""
        return ModuleStatistics(self.hessian.to(device), self.row_weights.to(device), self.transposed, tuple(o.to(device) for o in self.also))

    @functools.cached_property
    def is_diagonal(self) -> bool:
        """True without input correlations (data-free, embeddings): no error can be compensated across columns."""
        if self.hessian.dim() == 1:
            return True
        return bool(torch.count_nonzero(self.hessian - torch.diag(torch.diagonal(self.hessian))) == 0)

    @property
    def diagonal(self) -> torch.Tensor:
        """The Hessian's diagonal ``[cols]``: each input's second moment."""
        return self.hessian if self.hessian.dim() == 1 else torch.diagonal(self.hessian)

    @property
    def compact_hessian(self) -> torch.Tensor:
        """The Hessian, as its diagonal when it has nothing else (what the compressors take)."""
        return self.diagonal if self.is_diagonal else self.hessian

    @classmethod
    def identity(cls, shape: Sequence[int], transposed: bool = False, device=None) -> ModuleStatistics:
        """The data-free objective: the squared Frobenius error (a diagonal of ones, never a dense identity)."""
        rows, cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        return cls(torch.ones(cols, device=device), torch.ones(rows, device=device), transposed)


def token_gram(inputs: torch.Tensor) -> torch.Tensor:
    """``X^T X`` over every token of a batch of inputs (``[..., width]``) in float32 (one batch's sums are
    short); add it to a float64 sum in place, so sums over many batches keep their precision."""
    flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    return flat.T @ flat


class SharedGrams:
    """:func:`token_gram` of the last input seen, computed once for modules fed the same tensor
    (a transformer block's q, k and v projections; gate and up): hooks call it in turn."""

    def __init__(self):
        self.inputs, self.version, self.gram = None, None, None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs is not self.inputs or inputs._version != self.version:
            self.inputs, self.version, self.gram = inputs, inputs._version, token_gram(inputs)
        return self.gram

    def clear(self) -> None:
        self.inputs, self.version, self.gram = None, None, None


class StatisticsRecorder:
    """Gathers :class:`ModuleStatistics` of named 2-D modules through hooks, over forward and backward passes.

    While :meth:`recording`, every forward of a module adds its inputs' second moment (for an
    embedding, its token counts) and every backward through its output adds the squared output
    gradients; :meth:`statistics` averages them over the tokens seen.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = {name: module.get_base_layer() if isinstance(module, BaseTunerLayer) else module for name, module in modules.items()}
        for name, module in self.modules.items():
            if not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
                raise HfGraftError(f"Calibration statistics are for linear and embedding modules, not {name} ({type(module).__name__}).")
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts = dict.fromkeys(self.modules, 0)
        self.grams = SharedGrams()

    def _add(self, name: str, key: str, value: torch.Tensor) -> None:
        slot = self.sums.setdefault(name, {})
        if key in slot:
            slot[key].add_(value)
        else:
            slot[key] = value.to(torch.float64, copy=True)  # float64 sums, never the caller's tensor

    def _hook(self, name: str, module: nn.Module):
        def hook(_, args, output):
            inputs = args[0]
            if isinstance(module, nn.Embedding):
                ids = inputs.reshape(-1)
                self._add(name, "tokens", torch.bincount(ids.cpu(), minlength=module.num_embeddings).double())
            else:
                self._add(name, "inputs", self.grams(inputs).cpu())
            self.counts[name] += inputs.reshape(-1, inputs.shape[-1]).shape[0] if not isinstance(module, nn.Embedding) else inputs.numel()
            if not output.requires_grad:
                output.requires_grad_(True)
            output.register_hook(lambda grad: self._add(name, "gradients", grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(0).cpu()))
        return hook

    @contextlib.contextmanager
    def recording(self):
        """Hooks on every module while the block runs."""
        handles = [module.register_forward_hook(self._hook(name, module)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.grams.clear()

    def statistics(self) -> dict[str, ModuleStatistics]:
        """Each module's statistics over what was recorded; modules fed the same inputs (q, k and v)
        share one ``hessian`` tensor, so what is derived from it can be computed once."""
        statistics, hessians = {}, []
        for name, module in self.modules.items():
            found = self.sums.get(name, {})
            if "gradients" not in found or not self.counts[name]:
                raise HfGraftError(f"Calibration: module {name!r} received no input; is it used in forward?")
            tokens = self.counts[name]
            gradients = (found["gradients"] / tokens).float()
            if isinstance(module, nn.Embedding):
                frequency = (found["tokens"] / tokens).float()
                frequency = frequency + TOKEN_FLOOR * float(frequency.mean())
                statistics[name] = ModuleStatistics(gradients, frequency)
            else:
                hessian = (found["inputs"] / tokens).float()
                same = [seen for seen in hessians if seen.shape == hessian.shape and torch.equal(seen, hessian)]
                if not same:
                    hessians.append(hessian)
                statistics[name] = ModuleStatistics(same[0] if same else hessian, gradients, isinstance(module, Conv1D))
        return statistics


def collect_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Sequence[Any],
    *,
    progress: bool = True,
) -> dict[str, ModuleStatistics]:
    """:class:`ModuleStatistics` of each named 2-D module (``nn.Linear``, ``Conv1D``, ``nn.Embedding``).

    ``modules`` maps names to modules of ``model``; ``batches`` are ``input_ids`` tensors or dicts
    of model inputs. One forward and backward pass per batch of the next-token loss; the model's
    parameters are left untouched (no gradient is stored in them).
    """
    if not batches:
        raise HfGraftError("The calibration set is empty: give at least one batch of input_ids.")
    recorder = StatisticsRecorder(modules)
    handles = []
    embeddings = model.get_input_embeddings()
    if embeddings is not None:  # gradients must flow from the first layer on, whichever modules are measured
        handles.append(embeddings.register_forward_hook(lambda _, args, output: output.requires_grad_(True) if not output.requires_grad else None))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), recorder.recording():
            for batch in tqdm(batches, desc="Measuring what each module's output costs", disable=not progress):
                inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                if "labels" not in inputs:
                    mask = inputs.get("attention_mask")
                    inputs["labels"] = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, -100)
                loss = model(**inputs).loss
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return recorder.statistics()
