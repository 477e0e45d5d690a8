"""The record of a partly made SkillPack, so a killed extraction resumes where it stopped.

A :class:`Journal` with a folder keeps, in ``<output_dir>.partial``, every measured delta, the
chosen formats, every compressed decoder block (its stored tensors in a file of its own) and the
stages of block-by-block calibration done; ``output_dir`` appears only when the pack is complete.
Without a folder it keeps the same in memory. Under ``accelerate launch`` (or torchrun) each
process keeps its own record of the blocks it does and :meth:`Journal.gather` reads the others'.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from typing import Optional, Union

import torch

from ...errors import HfGraftError
from ...safetensors_io import atomic_write_json, load_tensors, save_tensors
from ..compression.formats import CompressedDelta
from ..files import SkillPackFile, tensor_key
from .packing import Measurement

__all__ = ["BasisFiles", "Journal", "processes"]

JOURNAL_NAME = "journal.json"
JOURNAL_VERSION = 1

Reference = Union[str, os.PathLike]


def processes():
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

    def mine(self, index: int) -> bool:
        """Whether block ``index`` is this process's to do (blocks are dealt out in turn)."""
        return index % self.processes == self.rank

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
