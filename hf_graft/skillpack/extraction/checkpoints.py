"""SkillPacks made straight from checkpoint files: neither model is ever loaded.

:func:`extract_from_checkpoints` reads the base and the tuned checkpoint (folders or Hub ids,
single or sharded safetensors) one tensor at a time (:class:`~hf_graft.sharded.Checkpoint`),
so its memory is a few of the largest deltas plus the pack, whatever the model's size. The
model's structure comes from its config, built on the meta device. :class:`CheckpointDeltas` is
the source of deltas of the extraction pipeline (:mod:`.pipeline`), the statistics none (data-free)
or measured block by block (:mod:`.sequential`), so the pack is the same file as from loaded models.

With ``output_dir`` the work is journalled in ``<output_dir>.partial``: every measured delta and
every compressed decoder block is recorded as it finishes, a killed run started again with the
same arguments resumes where it stopped and makes the same pack, and ``output_dir`` appears only
when the pack is complete. Under ``accelerate launch`` (or torchrun) the blocks are dealt out to
the processes, each journalling its own; the main process gathers them and writes the pack
(:mod:`.journal`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from typing import Any, Optional, Union

import torch

from ...errors import HfGraftError
from ...sharded import Checkpoint, iter_rows, meta_model, stored_name
from ..compression.rowwise import DeltaRows, is_large
from ..config import SkillPackConfig
from ..files import SkillPackFile
from ..model import fingerprint_stride, layer_class, sign_bytes, tied_partners
from .calibration_data import resolve_calibration
from .generated import checkpoint_calibration
from .journal import Journal, processes
from .packing import Delta, resolve_device
from .pipeline import BlockSweep, Pipeline
from .sequential import BlockwiseStatistics

__all__ = ["CheckpointDeltas", "extract_from_checkpoints"]

#: Rows of a delta built at a time from the two checkpoints (bytes of one float32 chunk).
CHUNK_BYTES = 64 << 20

Reference = Union[str, os.PathLike]


class CheckpointDeltas:
    """The weight deltas between two checkpoints of one architecture, made one at a time.

    ``keys`` lists every ``module.part`` SkillPacks support, in the model's forward order, a
    weight shared by several modules (tied embeddings) once; ``delta(key)`` reads both tensors
    row block by row block and returns ``tuned - base`` in float32 (a large one as its rows, read
    when they are used), ``sample(key)`` the base weight's fingerprint sample.
    """

    def __init__(self, base: Reference, tuned: Reference, *, revision: Optional[str] = None, token=None):
        self.base = Checkpoint(base, revision=revision, token=token)
        if os.path.isdir(os.fspath(tuned)) and os.path.isfile(os.path.join(os.fspath(tuned), "adapter_config.json")):
            raise HfGraftError(
                f"{tuned} is an adapter, not a checkpoint: extract from a LoRA adapter with the models loaded "
                "(extract_skillpack(base_model, 'adapter/path')), or merge it first."
            )
        self.tuned = Checkpoint(tuned, revision=revision, token=token)
        self.skeleton = meta_model(self.base.folder)
        prefix = getattr(self.skeleton, "base_model_prefix", "")
        modules = dict(self.skeleton.named_modules())
        self.conv1d = {name for name, module in modules.items() if type(module).__name__ == "Conv1D"}
        self.files: dict[str, str] = {}  # module.part -> tensor name in the checkpoints
        seen = set()
        for name, module in modules.items():
            if layer_class(module) is None:
                continue
            for part in ("weight", "bias"):
                parameter = getattr(module, part, None)
                if not isinstance(parameter, torch.Tensor) or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                key = f"{name}.{part}"
                stored = stored_name(key, self.base, prefix)
                if stored is None:
                    continue  # not saved (a buffer the model rebuilds)
                for checkpoint in (self.base, self.tuned):
                    if stored not in checkpoint:
                        raise HfGraftError(f"{checkpoint.reference} holds no {stored}: the checkpoints are not of the same architecture.")
                    if checkpoint.shape(stored) != tuple(parameter.shape) or not checkpoint.dtype(stored).is_floating_point:
                        raise HfGraftError(
                            f"{checkpoint.reference}: {stored} is {checkpoint.dtype(stored)} {checkpoint.shape(stored)}, "
                            f"the model's config makes it {tuple(parameter.shape)}: not the same architecture."
                        )
                self.files[key] = stored
        if not self.files:
            raise HfGraftError(f"{self.base.reference} holds no weight SkillPacks support.")
        self.keys = list(self.files)
        self.model_class = type(self.skeleton)
        self.tied = tied_partners(self.skeleton, {key.rsplit(".", 1)[0] for key in self.keys})

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(self.files[key])

    def delta(self, key: str, device: torch.device = torch.device("cpu")) -> Delta:
        """``tuned - base`` in float32 on ``device``; for a large delta (:func:`~.rowwise.is_large`)
        its :class:`~.rowwise.DeltaRows`, read from the checkpoints block by block when used."""
        stored, shape = self.files[key], self.shape(key)
        if is_large(shape, key.rsplit(".", 1)[0] in self.conv1d):
            def read(start: int, stop: int) -> torch.Tensor:
                rows = slice(start, stop)
                return (self.tuned.read(stored, rows).float() - self.base.read(stored, rows).float()).to(device)

            return DeltaRows(shape, read, device)
        delta = torch.empty(shape, dtype=torch.float32)
        if len(shape) < 2:
            delta.copy_(self.tuned.read(stored).float() - self.base.read(stored).float())
            return delta.to(device)
        for rows in iter_rows(shape[0], delta[0].numel() * 4, CHUNK_BYTES):
            delta[rows] = self.tuned.read(stored, rows).float() - self.base.read(stored, rows).float()
        return delta.to(device)

    def sample(self, key: str) -> bytes:
        """The fingerprint sample of the base weight ``key`` (:func:`~.model.fingerprint_of`)."""
        stored, shape = self.files[key], self.shape(key)
        if len(shape) < 2:
            base = self.base.read(stored)
            return sign_bytes(base[:: fingerprint_stride(base.numel())])
        row, stride = math.prod(shape[1:]), fingerprint_stride(math.prod(shape))
        samples = [self.base.read(stored, rows).reshape(-1)[-(rows.start * row) % stride :: stride]
                   for rows in iter_rows(shape[0], row * 4, CHUNK_BYTES)]
        return sign_bytes(torch.cat(samples))

    def inputs_digest(self, config: SkillPackConfig, device: torch.device, processes: int = 1, batches: Optional[list] = None) -> str:
        """What a journal must match to be resumed: both checkpoints' files and layout, the config, the
        device, the number of processes sharing the work and the calibration batches."""
        files = {
            side: [(shard, os.path.getsize(os.path.join(c.folder, shard)), os.stat(os.path.join(c.folder, shard)).st_mtime_ns) for shard in c.shards]
            for side, c in (("base", self.base), ("tuned", self.tuned))
        }
        described = {"files": files, "keys": self.files, "config": config.to_json_text(), "device": device.type, "processes": processes}
        if batches is not None:
            calibration = hashlib.sha256()
            for batch in batches:
                for name in sorted(batch):
                    calibration.update(f"{name}{tuple(batch[name].shape)}".encode())
                    calibration.update(batch[name].contiguous().cpu().numpy().tobytes())
            described["calibration"] = calibration.hexdigest()
        text = json.dumps(described, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def extract_from_checkpoints(
    base: Reference,
    tuned: Reference,
    config: Optional[SkillPackConfig] = None,
    *,
    calibration: Any = None,
    tokenizer=None,
    output_dir: Optional[Reference] = None,
    device: Union[str, torch.device] = "auto",
    progress: bool = True,
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> SkillPackFile:
    """Compress ``tuned - base`` into a SkillPack, reading both checkpoints one tensor at a time.

    ``base`` and ``tuned`` are model folders or Hub ids of the same architecture (safetensors,
    single file or sharded). With ``calibration=None`` (the default) the pack is data-free (each
    delta compressed for its Frobenius error relative to its norm; the work may be shared by several
    processes). Otherwise it is calibrated with the model run one decoder block at a time
    (:mod:`.sequential`), in one process, on calibration batches (``input_ids`` tensors or dicts
    with ``attention_mask`` and ``labels``), a ``.safetensors`` file of samples, ``"generate"``
    (samples of the tuned model, each checkpoint loaded in turn with accelerate's big-model
    inference, see :mod:`.generated`), or ``"pydoc"`` (text tokenized with ``tokenizer`` or the
    base folder's own). ``device`` runs the compression on ``"cuda"``, ``"cpu"`` or, with ``"auto"``, the
    GPU when there is one. With ``output_dir`` the pack is written there, resumably (see the
    module's docs); the pack is returned either way.
    """
    config = copy.deepcopy(config) if config is not None else SkillPackConfig()
    device = resolve_device(device)
    deltas = CheckpointDeltas(base, tuned, revision=revision, token=token)
    config.base_model_name_or_path = config.base_model_name_or_path or deltas.base.reference
    batches = resolve_calibration(
        calibration, tokenizer, deltas.base.folder, config, distill_steps=0,
        sampler=lambda samples, length: checkpoint_calibration(deltas.base.folder, deltas.tuned.folder, samples, length, progress=progress),
        vocabulary=getattr(deltas.skeleton.config, "vocab_size", None),
    )
    rank, count, wait = processes()
    if count > 1 and output_dir is None:
        raise HfGraftError("Extraction over several processes needs output_dir: the processes share their work through it.")
    if count > 1 and batches is not None:
        raise HfGraftError(
            "Calibrated extraction from checkpoints runs block after block, in one process: launch it without accelerate, "
            "or pass calibration=None (--calibration none) for a data-free pack shared by the processes."
        )
    journal = Journal(output_dir, deltas.inputs_digest(config, device, count, batches), rank=rank, processes=count, wait=wait)
    statistics = BlockSweep() if batches is None else BlockwiseStatistics(deltas, batches, device)
    return Pipeline(deltas, config, journal, device, progress).run(statistics)
