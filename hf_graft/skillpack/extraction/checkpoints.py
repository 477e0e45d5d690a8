"""SkillPacks made straight from checkpoint files: neither model is ever loaded.

:func:`extract_from_checkpoints` reads the base and the tuned checkpoint (folders or Hub ids,
single or sharded safetensors) one tensor at a time (:class:`~hf_graft.sharded.Checkpoint`),
so its memory is a few of the largest deltas plus the pack, whatever the model's size. The
model's structure comes from its config, built on the meta device. Each delta goes through the
same steps as extraction from loaded models (:mod:`.packing`), so the pack is the same file.

With ``output_dir`` the work is journalled in ``<output_dir>.partial``: every measured delta and
every compressed decoder block is recorded as it finishes, a killed run started again with the
same arguments resumes where it stopped and makes the same pack, and ``output_dir`` appears only
when the pack is complete. Under ``accelerate launch`` (or torchrun) the blocks are dealt out to
the processes, each journalling its own; the main process gathers them and writes the pack.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import MutableMapping
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from ...errors import HfGraftError
from ...process_memory import release_freed_memory
from ...safetensors_io import atomic_write_json, load_tensors, save_tensors
from ...sharded import Checkpoint, iter_rows, meta_model, stored_name
from .calibration_data import default_batches, limited_batches
from ..compression.formats import CompressedDelta
from ..config import SkillPackConfig
from ..files import SkillPackFile, tensor_key
from ..model import fingerprint_of, fingerprint_stride, layer_class, sign_bytes, tied_partners
from .packing import BF16_BYTES, Delta, Measurement, assemble, block_groups, choose, compress, delta_error_sq, measure, resolve_device
from ..compression.rowwise import DeltaRows, is_large
from .sequential import extract_sequential

__all__ = ["CheckpointDeltas", "Journal", "extract_from_checkpoints"]

JOURNAL_NAME = "journal.json"
JOURNAL_VERSION = 1
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
    single file or sharded). With ``calibration=None`` the pack is data-free (each delta
    compressed for its Frobenius error); with calibration batches (``input_ids`` tensors or dicts
    with ``attention_mask``), or ``"pydoc"`` (text tokenized with ``tokenizer`` or the base
    folder's own), it
    is calibrated with the model run one decoder block at a time (:mod:`.sequential`), in one
    process. ``device`` runs the compression on ``"cuda"``, ``"cpu"`` or, with ``"auto"``, the
    GPU when there is one. With ``output_dir`` the pack is written there, resumably (see the
    module's docs); the pack is returned either way.
    """
    config = copy.deepcopy(config) if config is not None else SkillPackConfig()
    device = resolve_device(device)
    deltas = CheckpointDeltas(base, tuned, revision=revision, token=token)
    config.base_model_name_or_path = config.base_model_name_or_path or deltas.base.reference
    batches = _calibration(calibration, tokenizer, deltas, config)
    rank, processes, wait = _processes()
    if processes > 1 and output_dir is None:
        raise HfGraftError("Extraction over several processes needs output_dir: the processes share their work through it.")
    if processes > 1 and batches is not None:
        raise HfGraftError("Calibrated extraction from checkpoints runs block after block, in one process: launch it without accelerate.")
    digest = deltas.inputs_digest(config, device, processes, batches)
    journal = Journal(output_dir, digest, rank=rank, processes=processes, wait=wait)
    if batches is not None:
        return _extract_calibrated(deltas, config, batches, journal, device, progress)
    mine = lambda index: index % processes == rank  # noqa: E731
    conv1d = lambda key: key.rsplit(".", 1)[0] in deltas.conv1d  # noqa: E731
    groups = block_groups(deltas.keys)
    todo = [group for index, group in enumerate(groups) if mine(index) and not all(key in journal.seen for key in group)]
    for group in tqdm(todo, desc="Measuring SkillPack candidates", unit="block", disable=not progress):
        for key in group:
            delta, journal.samples[key] = deltas.delta(key, device), deltas.sample(key)
            if delta.any_nonzero() if isinstance(delta, DeltaRows) else torch.count_nonzero(delta):
                journal.measured[key] = measure(key, delta, None, config, conv1d=conv1d(key), bases=journal.bases)
            journal.seen.add(key)
            del delta
            release_freed_memory()
        journal.save()
    journal.gather()
    measured = {key: journal.measured[key] for key in deltas.keys if key in journal.measured}
    if not measured:
        raise HfGraftError("The tuned checkpoint has the same weights as the base: there is no skill to extract.")
    bf16_bytes = sum(math.prod(deltas.shape(key)) * BF16_BYTES for key in measured)
    model_class = type(deltas.skeleton)
    if journal.kept is None:  # every process chooses the same from the same measurements
        journal.kept = choose(measured, config, bf16_bytes, model_class)
        journal.save()
    kept = journal.kept
    groups = block_groups([key for key in deltas.keys if key in kept])
    todo = [(index, group) for index, group in enumerate(groups) if mine(index) and index not in journal.blocks]
    for index, group in tqdm(todo, desc="Compressing SkillPack deltas", unit="block", disable=not progress):
        block, errors = {}, {}
        for key in group:
            delta = deltas.delta(key, device)
            block[key] = packed = compress(key, delta, kept[key], None, conv1d=conv1d(key), basis=journal.bases.get(key))
            errors[key] = delta_error_sq(delta, packed, conv1d=conv1d(key))
            del delta
            release_freed_memory()
        journal.save_block(index, block, errors)
    journal.gather()
    recorded = journal.all_compressed()
    compressed = {key: recorded[key] for key in deltas.keys if key in recorded}
    modules = {key.rsplit(".", 1)[0] for key in compressed}
    fingerprint = fingerprint_of((name, (journal.samples[f"{name}.weight"], deltas.shape(f"{name}.weight"))) for name in modules)
    pack = assemble(
        config, compressed, measured, journal.errors_sq, bf16_bytes=bf16_bytes, model_class=model_class,
        tied_modules=deltas.tied, fingerprint=fingerprint,
    )
    journal.finish(pack, model_class)
    return pack


def _calibration(calibration: Any, tokenizer, deltas: CheckpointDeltas, config: SkillPackConfig) -> Optional[list]:
    """The calibration batches as dicts, or ``None``; ``config.calibration_samples`` is set to their count and an
    unset ``config.distill_steps`` to 0 (blocks are not distilled unless asked)."""
    if isinstance(calibration, str):
        if calibration != "pydoc":
            raise HfGraftError(f"calibration must be 'pydoc', batches of input_ids or None, got {calibration!r}.")
        calibration = default_batches(deltas.base.folder, tokenizer, config.calibration_samples)
    if calibration is None:
        config.calibration_samples, config.distill_steps = 0, 0
        return None
    batches, config.calibration_samples = limited_batches(calibration, config.calibration_samples)
    config.distill_steps = config.distill_steps or 0
    return [dict(batch) if isinstance(batch, dict) else {"input_ids": batch} for batch in batches]


def _extract_calibrated(deltas: CheckpointDeltas, config: SkillPackConfig, batches: list, journal: Journal, device, progress: bool) -> SkillPackFile:
    """A calibrated pack, the model run one block at a time (:func:`~.sequential.extract_sequential`)."""
    model_class = type(deltas.skeleton)

    def chosen(measured: dict) -> dict:
        if journal.kept is None:
            bf16_bytes = sum(math.prod(deltas.shape(key)) * BF16_BYTES for key in measured)
            journal.kept = choose(measured, config, bf16_bytes, model_class)
            journal.save()
        return journal.kept

    measured, compressed, losses = extract_sequential(deltas, config, batches, journal, chosen, device=device, progress=progress)
    bf16_bytes = sum(math.prod(deltas.shape(key)) * BF16_BYTES for key in measured)
    modules = {key.rsplit(".", 1)[0] for key in compressed}
    fingerprint = fingerprint_of((name, (journal.samples[f"{name}.weight"], deltas.shape(f"{name}.weight"))) for name in modules)
    pack = assemble(
        config, compressed, measured, journal.errors_sq, bf16_bytes=bf16_bytes, model_class=model_class,
        tied_modules=deltas.tied, fingerprint=fingerprint, distill_losses=losses,
    )
    journal.finish(pack, model_class)
    return pack


def _processes():
    """``(index, count, barrier)`` of this process among those ``accelerate launch`` (or torchrun) started."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


class Journal:
    """The record of a partly made pack in ``<output_dir>.partial`` (with no ``output_dir``, in memory only).

    ``seen`` deltas have been read (``measured`` holds the non-zero ones' candidates, ``samples``
    every base weight's fingerprint sample); ``kept`` is the chosen spec per delta once chosen;
    ``blocks`` are the indices of compressed decoder blocks, whose deltas stay in their block files
    until :meth:`all_compressed` reads them back (in memory only without ``output_dir``).
    Each of several processes keeps its own record (``journal-<rank>-of-<count>.json``) of the
    blocks it does; :meth:`gather` reads the others' once they are done.
    """

    def __init__(self, output_dir: Optional[Reference], digest: str, *, rank: int = 0, processes: int = 1, wait=lambda: None):
        self.digest, self.rank, self.processes, self.wait = digest, rank, processes, wait
        self.seen: set[str] = set()
        self.measured: dict[str, Measurement] = {}
        self.samples: dict[str, bytes] = {}
        self.kept: Optional[dict] = None
        self.blocks: set[int] = set()
        self.compressed: dict[str, CompressedDelta] = {}
        self.errors_sq: dict[str, float] = {}
        self._block_entries: dict[str, dict] = {}
        self._on_disk: dict[int, dict] = {}  # recorded blocks whose deltas are in their files only
        self.stages: dict[str, set[int]] = {}  # block-by-block calibration: the stages of each phase done
        self.distill_losses: dict[int, list[float]] = {}  # and each block's distillation losses
        self.output_dir = self.folder = None
        self.bases: MutableMapping[str, torch.Tensor] = {}  # A^T of the factors measuring made, to compress on
        if output_dir is None:
            return
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        if os.path.isfile(self.output_dir) or (os.path.isdir(self.output_dir) and os.listdir(self.output_dir)):
            raise HfGraftError(f"{output_dir} already exists and is not empty; give a new folder for the SkillPack.")
        self.folder = self.output_dir + ".partial"
        self.bases = BasisFiles(self.folder)
        if rank == 0:
            os.makedirs(self.folder, exist_ok=True)
        wait()
        if os.path.isfile(self._path(rank)):
            self._absorb(self._read(self._path(rank)), own=True)

    def _path(self, rank: int) -> str:
        name = JOURNAL_NAME if self.processes == 1 else f"journal-{rank}-of-{self.processes}.json"
        return os.path.join(self.folder, name)

    def _read(self, path: str) -> dict:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HfGraftError(f"{path} is unreadable ({error}); delete {self.folder} to start again.") from None
        if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION or data.get("inputs") != self.digest:
            raise HfGraftError(
                f"{self.folder} holds a partial SkillPack made from other checkpoints or settings; "
                "delete it to start again, or rerun with the arguments it was started with."
            )
        return data

    def _absorb(self, data: dict, *, own: bool = False) -> None:
        """Take in a record: this process's own (to resume) or another's (its finished work)."""
        self.seen |= set(data["seen"])
        self.measured.update((key, Measurement.from_json(value)) for key, value in data["measured"].items())
        self.samples.update((key, bytes.fromhex(value)) for key, value in data["samples"].items())
        if own:
            self.kept = data["kept"]
            self._block_entries = data["blocks"]
            self.stages = {phase: set(stages) for phase, stages in data.get("stages", {}).items()}
            self.distill_losses = {int(index): losses for index, losses in data.get("distill_losses", {}).items()}
        for index, block in data["blocks"].items():
            if int(index) in self.blocks:
                continue
            self.errors_sq.update((key, float(entry["error_sq"])) for key, entry in block.items())
            self.blocks.add(int(index))
            self._on_disk[int(index)] = block

    def all_compressed(self) -> dict[str, CompressedDelta]:
        """Every compressed delta recorded, read back from the block files (kept on disk till now)."""
        for index, block in sorted(self._on_disk.items()):
            tensors, _ = load_tensors(os.path.join(self.folder, _block_name(index)))
            for key, entry in block.items():
                name, part = key.rsplit(".", 1)
                self.compressed[key] = CompressedDelta.from_tensors(part, {part: tensors[tensor_key(name, part)]}, entry["meta"])
        self._on_disk = {}
        return self.compressed

    def gather(self) -> None:
        """Wait for every process, then take in what the others recorded; return once every process
        has (the main process removes the records when it writes the pack)."""
        if self.processes == 1:
            return
        self.wait()
        for rank in range(self.processes):
            if rank != self.rank:
                self._absorb(self._read(self._path(rank)))
        self.wait()

    def save(self) -> None:
        """Record the state so far (atomically: a kill leaves the previous record or this one)."""
        if self.folder is None:
            return
        atomic_write_json(
            self._path(self.rank),
            {
                "version": JOURNAL_VERSION,
                "inputs": self.digest,
                "seen": sorted(self.seen),
                "measured": {key: value.to_json() for key, value in self.measured.items()},
                "samples": {key: value.hex() for key, value in self.samples.items()},
                "kept": self.kept,
                "blocks": self._block_entries,
                "stages": {phase: sorted(stages) for phase, stages in self.stages.items()},
                "distill_losses": {str(index): losses for index, losses in self.distill_losses.items()},
            },
        )

    def save_block(self, index: int, block: dict[str, CompressedDelta], errors: dict[str, float], losses: Optional[list] = None) -> None:
        """Record one compressed block: its stored tensors in a file of its own (read back by
        :meth:`all_compressed`, so memory does not grow with the pack), then the journal (with the
        block's distillation ``losses``, if any)."""
        self.errors_sq.update(errors)
        if losses:
            self.distill_losses[index] = list(losses)
        self.blocks.add(index)
        if self.folder is None:
            self.compressed.update(block)
            return
        tensors = {}
        for key, packed in block.items():
            name, part = key.rsplit(".", 1)
            tensors[tensor_key(name, part)] = packed.to_tensors(part)[part]
        save_tensors(tensors, os.path.join(self.folder, _block_name(index)))
        entries = {key: {"meta": packed.meta, "error_sq": errors[key]} for key, packed in block.items()}
        self._block_entries = {**self._block_entries, str(index): entries}
        self._on_disk[index] = entries
        self.save()

    def record_stage(self, phase: str, stage: int) -> None:
        """Record that ``stage`` of a block-by-block ``phase`` (:mod:`.sequential`) is done."""
        self.stages.setdefault(phase, set()).add(stage)
        self.save()

    def finish(self, pack: SkillPackFile, model_class: type) -> None:
        """The main process writes the pack into the partial folder, drops the records and moves
        the folder into place; the others wait for it."""
        if self.folder is None:
            return
        self.wait()  # every process has read the blocks back (all_compressed) before they are removed
        if self.rank == 0:
            for name in os.listdir(self.folder):
                os.unlink(os.path.join(self.folder, name))
            pack.save_pretrained(self.folder, model_class=model_class)
            if os.path.isdir(self.output_dir):
                os.rmdir(self.output_dir)  # empty: checked when the journal was opened
            os.replace(self.folder, self.output_dir)
        self.wait()


class BasisFiles(MutableMapping):
    """The low-rank factors (``A^T``) measuring made of each delta, one safetensors file each in the journal's folder
    (``basis-<module.part>.safetensors``), so any process compressing a delta reuses them, and a
    resumed run too; a file that is missing or does not hold one float32 matrix is not a basis."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"basis-{key}.safetensors")

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            tensors, _ = load_tensors(self._path(key))
        except (OSError, HfGraftError):
            raise KeyError(key) from None
        basis = tensors.get("basis")
        if basis is None or basis.dim() != 2 or basis.dtype != torch.float32:
            raise KeyError(key)
        return basis

    def __setitem__(self, key: str, basis: torch.Tensor) -> None:
        save_tensors({"basis": basis.float()}, self._path(key))

    def __delitem__(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            raise KeyError(key) from None

    def __iter__(self):
        prefix, suffix = "basis-", ".safetensors"
        return (name[len(prefix):-len(suffix)] for name in sorted(os.listdir(self.folder)) if name.startswith(prefix) and name.endswith(suffix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _block_name(index: int) -> str:
    return f"block-{index:05d}.safetensors"
