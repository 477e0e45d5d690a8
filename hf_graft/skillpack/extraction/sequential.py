"""Calibrated SkillPacks from checkpoints larger than memory: the model run one decoder block at a time.

As GPTQ's and llm-compressor's sequential mode do, the calibration batches go through the model
block by block: a block's weights are read from the checkpoints, the hidden states entering it
are run through it, and its weights are dropped again. Only the embeddings (while the inputs are
embedded), one block, the head (at the end) and the calibration set's hidden states are ever in
memory; the hidden states between blocks are kept on disk.

:class:`BlockwiseStatistics` makes three sweeps over the blocks:

1. **Forward** through the tuned model, keeping every block's inputs.
2. **Backward** from the next-token loss, block by block from the head down, each block run
   again on its kept inputs: each module's input second moment ``H`` and output sensitivity ``f``
   are recorded exactly as :func:`~.objective.collect_statistics` records them on a loaded model,
   and every candidate format of the block's deltas is measured under them. Each ``H`` is kept on
   disk (once for modules fed the same input, such as q, k and v) in place of the block's inputs.
   With every block measured, the pipeline (:mod:`.pipeline`) chooses one format per delta to fit
   the budget, as for every pack.
3. **Compress**, block after block: each delta is compressed as chosen (GPTQ under its kept ``H``),
   no block is run again. With ``config.distill_steps`` (none by default) a block's stored
   scales, zeros and fp16 values are then distilled for that many steps so that, fed the hidden
   states of the base plus the blocks compressed so far, the block's outputs match the tuned
   model's hidden states after it (:func:`~.distillation.distill_block`); the hidden states of
   sweep 1 are kept for it, and the compressed stream is carried block to block.

With a journal every stage of every sweep is recorded as it finishes, beside the hidden states
after it, so a killed run resumes at the block where it stopped and makes the same pack.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ...errors import HfGraftError
from ...process_memory import release_freed_memory
from ...safetensors_io import load_tensors, read_checked_header, save_tensors
from ...sharded import stored_name
from ..compression.formats import CompressedDelta
from ..config import SkillPackConfig
from ..compression.distillation import distill_block
from ..compression.objective import ModuleStatistics, StatisticsRecorder
from .packing import delta_error_sq

__all__ = ["BlockwiseModel", "BlockwiseStatistics"]

Source = Callable[[str], torch.Tensor]

#: What :attr:`BlockwiseStatistics.statistics` holds in place of a block module's Hessian (kept on disk instead).
_NO_HESSIAN = torch.ones(1)

#: Bytes of float32 logits the head's backward holds at once.
LOGITS_CHUNK_BYTES = 64 << 20


class _Caught(Exception):
    """Raised by :class:`_Catcher` to stop the forward pass at the first decoder block."""


class _Catcher(nn.Module):
    """Stands in for the first decoder block: records how it is called, then stops the model."""

    def __init__(self, keep_graph: bool):
        super().__init__()
        self.keep_graph = keep_graph
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {key: value for key, value in kwargs.items() if key not in ("past_key_values", "past_key_value", "layer_past")}
        self.calls.append((hidden_states if self.keep_graph else hidden_states.detach(), args, kwargs))
        raise _Caught


class BlockwiseModel:
    """The causal LM of a pair of checkpoints, run one part at a time.

    ``deltas`` (:class:`~.checkpoints.CheckpointDeltas`) gives both checkpoints and the model's
    structure (its config, parameters on the meta device). :meth:`load` reads a part's parameters
    in float32 onto ``device``, :meth:`drop` puts them back on the meta device. The parts are
    what runs before the decoder blocks, each block, the modules between the last block and the
    head (``tail``), and the head.
    """

    def __init__(self, deltas, device: torch.device):
        self.deltas, self.device = deltas, device
        self.model = deltas.skeleton
        self.prefix = getattr(self.model, "base_model_prefix", "")
        self.layers_name, self.layers = _decoder_layers(self.model)
        parent_name = self.layers_name.rpartition(".")[0]
        parent = self.model.get_submodule(parent_name)
        first = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            first.setdefault(id(parameter), name)
        self.canonical = {name: first[id(parameter)] for name, parameter in self.model.named_parameters(remove_duplicate=False)}
        head = self.model.get_output_embeddings()
        self.head_name = next((name for name, module in self.model.named_modules() if module is head), None)
        if self.head_name is None:
            raise HfGraftError(f"{type(self.model).__name__} has no output embeddings: block-by-block calibration is for causal LMs.")
        self.before: list[str] = []  # the parts with weights that run before the first block
        self.tail: list[str] = []  # those the last block's output goes through before the head
        seen_layers = False
        for name, child in parent.named_children():
            if child is self.layers:
                seen_layers = True
            elif any(True for _ in child.parameters()):
                (self.tail if seen_layers else self.before).append(f"{parent_name}.{name}" if parent_name else name)

    def block_name(self, index: int) -> str:
        return f"{self.layers_name}.{index}"

    def stage_of(self, key: str) -> int:
        """``key``'s stage: 0 before the blocks, ``i + 1`` for block ``i``, ``len(layers) + 1`` for the tail and head."""
        prefix = f"{self.layers_name}."
        if key.startswith(prefix):
            return int(key[len(prefix):].split(".", 1)[0]) + 1
        return len(self.layers) + 1 if key.rsplit(".", 1)[0] in self._after else 0

    @functools.cached_property
    def _after(self) -> set[str]:
        names = set()
        for part in (*self.tail, self.head_name):
            names |= {f"{part}.{sub}" if sub else part for sub, _ in self.model.get_submodule(part).named_modules()}
        return names

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def read(self, side: str, name: str) -> torch.Tensor:
        """The parameter ``name`` of the base or the tuned checkpoint, in float32 on the device."""
        name = self.canonical.get(name, name)
        checkpoint = self.deltas.base if side == "base" else self.deltas.tuned
        stored = self.deltas.files.get(name) or stored_name(name, checkpoint, self.prefix)
        if stored is None:
            raise HfGraftError(f"{checkpoint.reference} holds no tensor for {name}.")
        return checkpoint.read(stored).to(self.device, torch.float32)

    def load(self, names: Iterable[str], source: Source) -> None:
        """Set every parameter of the modules ``names`` to ``source(its name)``."""
        for module_name in names:
            module = self.module(module_name)
            for local, _ in list(module.named_parameters(remove_duplicate=False)):
                _set(module, local, nn.Parameter(source(self.canonical[f"{module_name}.{local}"]), requires_grad=False))

    def drop(self, names: Iterable[str]) -> None:
        """Put the modules' parameters back on the meta device."""
        for module_name in names:
            module = self.module(module_name)
            for local, parameter in list(module.named_parameters(remove_duplicate=False)):
                _set(module, local, nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype, device="meta"), requires_grad=False))
        release_freed_memory()

    def embed(self, batches: Sequence[dict], *, keep_graph: bool = False, counts: Optional[dict] = None) -> list:
        """``(hidden_states, args, kwargs)`` entering the first block, per batch (the parts before
        it loaded); ``counts`` (if given) gets each embedding's index counts."""
        handles = []
        if counts is not None:
            for name in self.before:
                for sub, module in self.module(name).named_modules():
                    if isinstance(module, nn.Embedding):
                        handles.append(module.register_forward_hook(_counter(counts, f"{name}.{sub}" if sub else name, module.num_embeddings)))
        catcher, first = _Catcher(keep_graph), self.layers[0]
        self.layers[0] = catcher
        try:
            with torch.set_grad_enabled(keep_graph):
                for batch in batches:
                    try:
                        self.model(**{key: value.to(self.device) for key, value in batch.items() if key != "labels"}, use_cache=False)
                    except _Caught:
                        continue
                    raise HfGraftError(f"{type(self.model).__name__} never called its first decoder block.")
        finally:
            self.layers[0] = first
            for handle in handles:
                handle.remove()
        return catcher.calls

    def embedded(self, batches: Sequence[dict], source: Source, counts: Optional[dict] = None) -> list:
        """:meth:`embed` with the parts before the blocks loaded from ``source`` for the call."""
        self.load(self.before, source)
        try:
            return self.embed(batches, counts=counts)
        finally:
            self.drop(self.before)

    def run_block(self, index: int, calls: Sequence[tuple], hidden: Sequence[torch.Tensor]) -> list:
        """Block ``index`` (loaded) over each batch's ``hidden`` states."""
        with torch.no_grad():
            return [_output(self.layers[index](states, *args, **kwargs)).float() for states, (_, args, kwargs) in zip(hidden, calls)]

    def through_tail(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` after the last block through the tail (loaded): the head's inputs."""
        for name in self.tail:
            states = _output(self.module(name)(states))
        return states


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: its longest ``ModuleList`` of modules of one class."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None or "." not in best[0]:
        raise HfGraftError(f"{type(model).__name__} has no list of decoder blocks inside its base model to calibrate one by one.")
    return best


def _set(module: nn.Module, local: str, parameter: nn.Parameter) -> None:
    owner, _, leaf = local.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, parameter)


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def _counter(counts: dict, name: str, size: int):
    def hook(_, args, output):
        ids = args[0].reshape(-1).cpu()
        counts[name] = counts.get(name, 0) + torch.bincount(ids, minlength=size).double()
    return hook


class _States:
    """Per-batch hidden states (or their gradients), one file per phase and stage."""

    def __init__(self, folder: str):
        self.folder = folder

    def path(self, phase: str, stage: int) -> str:
        return os.path.join(self.folder, f"states-{phase}-{stage:05d}.safetensors")

    def save(self, phase: str, stage: int, streams: dict[str, list[torch.Tensor]]) -> None:
        tensors = {f"{name}.{i}": states.detach().cpu().contiguous() for name, batches in streams.items() for i, states in enumerate(batches)}
        save_tensors(tensors, self.path(phase, stage))

    def load(self, phase: str, stage: int, name: str, device: torch.device) -> list[torch.Tensor]:
        """One stream of a saved stage, every batch read at once."""
        return list(self.stream(phase, stage, name, device))

    def stream(self, phase: str, stage: int, name: str, device: torch.device) -> _Stream:
        """One stream of a saved stage, read a batch at a time (only one batch in memory)."""
        path = self.path(phase, stage)
        if not os.path.isfile(path):
            raise HfGraftError(f"{self.folder} lacks {os.path.basename(path)}; delete the partial folder to start again.")
        return _Stream(path, name, device)

    def remove(self, phase: str, stage: int) -> None:
        if os.path.isfile(self.path(phase, stage)):
            os.unlink(self.path(phase, stage))


class _Stream(Sequence):
    """The per-batch tensors ``name.0``, ``name.1``, ... of a states file, each read when indexed."""

    def __init__(self, path: str, name: str, device: torch.device):
        self.path, self.device = path, device
        found = {}
        for key in read_checked_header(path):
            stream, _, index = key.rpartition(".")
            if stream == name and index.isdigit():
                found[int(index)] = key
        if sorted(found) != list(range(len(found))):
            raise HfGraftError(f"{path} does not hold batches 0 to {len(found) - 1} of {name!r}; delete the partial folder to start again.")
        self.keys = [found[index] for index in range(len(found))]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        key = self.keys[index]
        try:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(key).to(self.device)
        except (SafetensorError, OSError) as e:
            raise HfGraftError(f"{self.path} could not be read ({e}); delete the partial folder to start again.") from e


def _labels(batch: dict) -> torch.Tensor:
    """Next-token targets as :func:`~.objective.collect_statistics` takes them (padding ignored)."""
    if "labels" in batch:
        return batch["labels"]
    mask = batch.get("attention_mask")
    return batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, -100)


def _loss_backward(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, labels: torch.Tensor, vocabulary: int) -> None:
    """Backward of the mean next-token cross-entropy (as transformers' causal LMs compute it) of
    ``head(states)``, run over a few positions at a time so a batch's logits are never whole."""
    targets = labels[:, 1:].to(states.device)
    count = (targets != -100).sum().clamp_min(1)
    positions = targets.shape[1]
    step = max(1, LOGITS_CHUNK_BYTES // (4 * len(states) * vocabulary))
    for start in range(0, positions, step):
        stop = min(start + step, positions)
        logits = head(states[:, start:stop])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets[:, start:stop].reshape(-1), ignore_index=-100, reduction="sum",
        )
        (loss / count).backward()


class BlockwiseStatistics:
    """The statistics of a calibrated pack from checkpoint files, measured with the model run one block
    at a time (module docs): the source of statistics of :class:`~.pipeline.Pipeline` for
    :class:`~.checkpoints.CheckpointDeltas` and calibration ``batches`` (dicts of ``input_ids``, and
    ``attention_mask``). With a journal folder the hidden states are kept there and the work
    resumes; without one, in a temporary folder."""

    def __init__(self, deltas, batches: Sequence[dict], device: torch.device):
        self.deltas, self.batches, self.device = deltas, batches, device
        self.model = BlockwiseModel(deltas, device)
        self.last = len(self.model.layers) + 1  # the tail's and head's stage
        self.keys_of: list[list[str]] = [[] for _ in range(self.last + 1)]
        for key in deltas.keys:
            self.keys_of[self.model.stage_of(key)].append(key)
        self.tied = {source: head for head, source in deltas.tied.items()}  # embedding -> the head sharing it
        self._scratch: Optional[tempfile.TemporaryDirectory] = None

    def measure(self, pipeline) -> None:
        """Sweeps 1 and 2: the tuned model's hidden states, then each block's statistics and measurements."""
        self.pipeline, self.journal, self.config, self.progress = pipeline, pipeline.journal, pipeline.config, pipeline.progress
        if self.journal.folder is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="skillpack-states-")
        self.states = _States(self.journal.folder or self._scratch.name)
        self.counts: dict[str, torch.Tensor] = {}
        self.calls = self.model.embedded(self.batches, self.tuned, self.counts)
        self.statistics = self._load_statistics()  # of the tuned model: row weights, and all of the embeddings' and head's
        self.forward()
        self.backward()

    def finish(self, pipeline, compressed: dict[str, CompressedDelta]) -> tuple[dict[str, CompressedDelta], list[float]]:
        """The compressed deltas as sweep 3 left them, and the blocks' distillation losses in order."""
        if self._scratch is not None:
            self._scratch.cleanup()
        journal = self.journal
        return compressed, [loss for stage in sorted(journal.distill_losses) for loss in journal.distill_losses[stage]]

    def tuned(self, name: str) -> torch.Tensor:
        return self.model.read("tuned", name)

    def base(self, name: str) -> torch.Tensor:
        return self.model.read("base", name)

    def conv1d(self, key: str) -> bool:
        return key.rsplit(".", 1)[0] in self.deltas.conv1d

    def done(self, phase: str) -> set:
        return self.journal.stages.get(phase, set())

    def _record(self, phase: str, stage: int, streams: dict) -> None:
        self.states.save(phase, stage, streams)
        self.journal.record_stage(phase, stage)

    def _weights(self, stage: int) -> list[str]:
        """The stage's 2-D linear modules with a delta."""
        names = [key.rsplit(".", 1)[0] for key in self.keys_of[stage] if key.endswith(".weight")]
        return [name for name in names if isinstance(self.model.module(name), (nn.Linear, Conv1D))]

    # --- sweep 1 ------------------------------------------------------------------------------

    def forward(self) -> None:
        """The tuned model's hidden states entering every block and the tail, kept on disk."""
        done, embedded = self.done("input"), [states for states, _, _ in self.calls]
        self.calls = [(None, args, kwargs) for _, args, kwargs in self.calls]  # the states are kept on disk from here
        if self.last in done:
            return
        start = max(done) if done else 1
        hidden = self.states.load("input", start, "tuned", self.device) if done else embedded
        del embedded
        if not done:
            self._record("input", 1, {"tuned": hidden})
        for stage in tqdm(range(start, self.last), desc="Running the tuned model", unit="block", disable=not self.progress):
            block = [self.model.block_name(stage - 1)]
            self.model.load(block, self.tuned)
            hidden = self.model.run_block(stage - 1, self.calls, hidden)
            self.model.drop(block)
            self._record("input", stage + 1, {"tuned": hidden})

    # --- sweep 2 ------------------------------------------------------------------------------

    def backward(self) -> None:
        """From the head down: each stage's statistics, and its deltas measured under them."""
        done = self.done("measure")
        if 0 in done:
            return
        gradients = self.states.stream("measure", min(done), "gradients", self.device) if done else None
        for stage in tqdm(range(self.last, -1, -1), desc="Measuring SkillPack candidates", unit="block", disable=not self.progress):
            if stage in done:
                continue
            found, results = self._backward(stage, gradients)
            for name, stats in found.items():  # a block's Hessians go to disk, not into memory for the whole sweep
                self.statistics[name] = stats if self._whole(name) else ModuleStatistics(_NO_HESSIAN, stats.row_weights, stats.transposed)
            self.pipeline.measure(self.keys_of[stage], {name: self._combined(name, stats) for name, stats in found.items()})
            self._save_statistics()
            if 0 < stage < self.last:
                self._save_hessians(stage, found)
            self._record("measure", stage, {"gradients": results or []})
            del results
            gradients = self.states.stream("measure", stage, "gradients", self.device)
            self.states.remove("measure", stage + 1)
            if not self.config.distill_steps:
                self.states.remove("input", stage + 1)

    def _backward(self, stage: int, gradients) -> tuple[dict, Optional[list]]:
        """The stage's modules' statistics, and the loss's gradients at the stage's inputs."""
        model = self.model
        if stage == 0:
            recorder = StatisticsRecorder({name: model.module(name) for name in self.counts})
            model.load(model.before, self.tuned)
            try:
                with recorder.recording():
                    for (states, _, _), gradient in zip(model.embed(self.batches, keep_graph=True), gradients):
                        states.backward(gradient)
            finally:
                model.drop(model.before)
            return recorder.statistics(), None
        hidden = self.states.stream("input", stage, "tuned", self.device)
        if stage == self.last:
            parts = [*model.tail, model.head_name]
            recorder = StatisticsRecorder({model.head_name: model.module(model.head_name)})
            head = lambda states: model.module(model.head_name)(model.through_tail(states))  # noqa: E731
            vocabulary = model.module(model.head_name).weight.shape[0]
            run = lambda states, index: _loss_backward(head, states, _labels(self.batches[index]), vocabulary)  # noqa: E731
        else:
            parts = [model.block_name(stage - 1)]
            recorder = StatisticsRecorder({name: model.module(name) for name in self._weights(stage)})
            layer = model.layers[stage - 1]

            def run(states, index):
                _, args, kwargs = self.calls[index]
                _output(layer(states, *args, **kwargs)).backward(gradients[index])

        model.load(parts, self.tuned)
        results = []
        try:
            with torch.enable_grad(), recorder.recording():
                for index, states in enumerate(hidden):
                    states = states.detach().requires_grad_(True)
                    run(states, index)
                    results.append(states.grad)
                    release_freed_memory()  # the batch's activations, so that batches do not pile up in the allocator
        finally:
            model.drop(parts)
        return recorder.statistics(), results

    def _combined(self, name: str, stats: ModuleStatistics) -> ModuleStatistics:
        """A tied embedding's statistics: measured through the head too (as for loaded models)."""
        head = self.statistics.get(self.model.head_name)
        if name in self.tied and head is not None:
            return ModuleStatistics(head.hessian, head.row_weights, also=(stats,))
        return stats

    def _whole(self, name: str) -> bool:
        """Whether a module's statistics are kept whole (embeddings, head), not its row weights alone."""
        return name == self.model.head_name or name in self.counts

    def _save_statistics(self) -> None:
        tensors = {}
        for name, stats in self.statistics.items():
            tensors[f"{name}.row_weights"] = stats.row_weights
            if self._whole(name):
                tensors[f"{name}.hessian"] = stats.hessian
        save_tensors(tensors, os.path.join(self.states.folder, "statistics.safetensors"))

    def _load_statistics(self) -> dict[str, ModuleStatistics]:
        path = os.path.join(self.states.folder, "statistics.safetensors")
        if not self.done("measure") or not os.path.isfile(path):
            return {}
        tensors, _ = load_tensors(path)
        found = {}
        for key, row_weights in tensors.items():
            name, kind = key.rsplit(".", 1)
            if kind == "row_weights":
                hessian = tensors.get(f"{name}.hessian", _NO_HESSIAN)
                found[name] = ModuleStatistics(hessian.to(self.device), row_weights.to(self.device), isinstance(self.model.module(name), Conv1D))
        return found

    # --- sweep 3 ------------------------------------------------------------------------------

    def compress(self, pipeline, kept: dict) -> None:
        """Sweep 3: every kept delta compressed, stage by stage, under the statistics the backward sweep
        kept; with distillation, on the hidden states of the base plus the blocks compressed so far."""
        journal, distilling = self.journal, bool(self.config.distill_steps)
        compressed = dict(journal.all_compressed())
        whole = {name: self._combined(name, stats) for name, stats in self.statistics.items() if self._whole(name)}
        stream = self.states.load("compress", max(journal.blocks), "compressed", self.device) if distilling and journal.blocks else None

        def packed(name: str) -> torch.Tensor:
            base = self.base(name)
            return base + compressed[name].delta().to(self.device) if name in compressed else base

        for stage in tqdm(range(self.last + 1), desc="Compressing SkillPack deltas", unit="block", disable=not self.progress):
            if stage not in journal.blocks:
                stream = self._compress_stage(stage, kept, compressed, whole, stream, packed)

    def _compress_stage(self, stage: int, kept: dict, compressed: dict, whole: dict, stream: Optional[list], packed: Source) -> Optional[list]:
        """The stage's kept deltas compressed (and, distilling, its blocks' values trained) into
        ``compressed`` and the journal; returns the compressed model's hidden states after it when distilling."""
        keys, losses = [key for key in self.keys_of[stage] if key in kept], None
        inner = 0 < stage < self.last
        block, errors = self.pipeline.compress(keys, kept, self._load_hessians(stage) if inner else whole)  # embeddings, head: kept whole
        if self.config.distill_steps and stage < self.last:
            if inner and block:
                block, errors, losses = self._distill(stage, block, stream)
            compressed.update(block)
            stream = self._packed_stream(stage, stream, packed)
            self.states.save("compress", stage, {"compressed": stream})
        compressed.update(block)
        self.journal.save_block(stage, block, errors, losses)
        self.states.remove("compress", stage - 1)
        self.states.remove("input", stage)
        if os.path.isfile(self._hessians_path(stage)):
            os.unlink(self._hessians_path(stage))
        return stream

    def _packed_stream(self, stage: int, stream: Optional[list], packed: Source) -> list:
        """The hidden states after ``stage`` of the base plus the deltas compressed so far."""
        if stage == 0:
            return [states for states, _, _ in self.model.embedded(self.batches, packed)]
        names = [self.model.block_name(stage - 1)]
        self.model.load(names, packed)
        try:
            return self.model.run_block(stage - 1, self.calls, stream)
        finally:
            self.model.drop(names)

    def _distill(self, stage: int, block: dict, stream: list) -> tuple[dict, dict, list]:
        """``block``'s stored values trained so the base block plus them maps ``stream`` (the compressed
        model's hidden states entering it) to the tuned model's hidden states leaving the block."""
        model, index = self.model, stage - 1
        names = [model.block_name(index)]
        prefix = f"{names[0]}."
        targets = self.states.load("input", stage + 1, "tuned", self.device)
        model.load(names, self.base)
        try:
            trained, losses = distill_block(
                model.layers[index], dict(model.layers[index].named_parameters()),
                {key[len(prefix):]: value for key, value in block.items()},
                [(states, args, kwargs) for states, (_, args, kwargs) in zip(stream, self.calls)], targets,
                steps=self.config.distill_steps, learning_rate=self.config.distill_learning_rate, progress=False,
            )
        finally:
            model.drop(names)
        block = {f"{prefix}{name}": value for name, value in trained.items()}
        errors = {key: delta_error_sq(self.deltas.delta(key, self.device), value, conv1d=self.conv1d(key)) for key, value in block.items()}
        return block, errors, losses

    def _hessians_path(self, stage: int) -> str:
        return os.path.join(self.states.folder, f"hessians-{stage:05d}.safetensors")

    def _save_hessians(self, stage: int, found: dict[str, ModuleStatistics]) -> None:
        """The stage's input second moments, each distinct tensor once (q, k and v share one)."""
        tensors, stored = {}, {}
        for name, stats in found.items():
            stored[name] = next((key for key, tensor in tensors.items() if tensor is stats.hessian), name)
            tensors.setdefault(stored[name], stats.hessian)
        save_tensors(tensors, self._hessians_path(stage), metadata={"modules": json.dumps(stored)})

    def _load_hessians(self, stage: int) -> dict[str, ModuleStatistics]:
        """What :meth:`_save_hessians` kept, with the tuned model's row weights: each module's statistics."""
        path = self._hessians_path(stage)
        if not os.path.isfile(path):
            raise HfGraftError(f"{self.states.folder} lacks {os.path.basename(path)}; delete the partial folder to start again.")
        widths = {name: _width(self.model.module(name)) for name in self._weights(stage)}
        tensors, metadata = load_tensors(path)
        try:
            stored = json.loads(metadata.get("modules", ""))
        except json.JSONDecodeError:
            stored = None
        if not isinstance(stored, dict) or set(stored) != set(widths) or not all(
            isinstance(key, str) and key in tensors and tuple(tensors[key].shape) == (widths[name], widths[name]) and tensors[key].dtype == torch.float32
            for name, key in stored.items()
        ):
            raise HfGraftError(f"{path} does not hold the input second moments of block {stage - 1}; delete the partial folder to start again.")
        return {name: ModuleStatistics(tensors[key].to(self.device), self.statistics[name].row_weights, self.statistics[name].transposed)
                for name, key in stored.items()}


def _width(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
