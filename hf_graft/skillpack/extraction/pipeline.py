"""One extraction pipeline: a source of deltas and a source of statistics plugged into the same steps.

Every SkillPack, from loaded models or from checkpoint files, calibrated or data-free, is made by
:meth:`Pipeline.run`:

1. **Measure**: the statistics source hands the pipeline groups of deltas with the statistics
   their errors are measured under; :meth:`Pipeline.measure` costs each delta's candidate formats
   (:func:`~.packing.measure`).
2. **Choose** one format per delta so the saved files fit the budget (:func:`~.packing.choose`).
3. **Compress**: the statistics source hands over the chosen deltas group by group again, with
   the statistics to compress them under (GPTQ); :meth:`Pipeline.compress` stores them.
4. **Finish**: the statistics source may train the stored values further (scale distillation);
   the pack is assembled with its figures (:func:`~.packing.assemble`) and written.

Every step is recorded in a :class:`~.journal.Journal` (in memory, or in a folder to resume).

Sources of deltas (:class:`DeltaSource`):

- :class:`~.loaded.ModelDeltas`: a loaded base and tuned model, or a LoRA adapter on the base;
- :class:`~.checkpoints.CheckpointDeltas`: two checkpoints, read tensor by tensor.

Sources of statistics (:class:`StatisticsSource`), which also set the order the deltas go in:

- :class:`BlockSweep`: statistics known before measuring (none: a data-free pack), decoder block by
  decoder block in the model's order, the blocks dealt out to the processes;
- :class:`~.loaded.ModelStatistics`: measured on the loaded tuned model, measured again before each
  block on the model carrying the blocks compressed so far, the stored values distilled end to end;
- :class:`~.sequential.BlockwiseStatistics`: measured with the model run one decoder block at a time
  from checkpoint files (for models larger than memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional, Protocol

import torch
from tqdm.auto import tqdm

from ...errors import HfGraftError
from ...process_memory import release_freed_memory
from ..compression.formats import CompressedDelta
from ..compression.objective import ModuleStatistics
from ..compression.rowwise import DeltaRows
from ..config import SkillPackConfig
from ..files import SkillPackFile
from ..model import fingerprint_of
from .journal import Journal
from .packing import BF16_BYTES, Delta, assemble, block_groups, choose, compress, delta_error_sq, measure

__all__ = ["BlockSweep", "DeltaSource", "Pipeline", "StatisticsSource"]


class DeltaSource(Protocol):
    """The weight deltas of a tuned model against its base, made one at a time.

    ``keys`` lists every ``module.part`` with a delta SkillPacks support, in the model's forward
    order (a weight shared by several modules once); ``conv1d`` names the ``Conv1D`` modules,
    ``tied`` maps a head to the embedding it shares its weight with, ``model_class`` is the base
    model's class.
    """

    keys: list[str]
    conv1d: set[str]
    tied: dict[str, str]
    model_class: type

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of the weight ``key`` (any ``module.part`` of the model)."""

    def delta(self, key: str, device: torch.device) -> Delta:
        """``tuned - base`` of ``key`` in float32 on ``device`` (a large one may be given by its rows)."""

    def sample(self, key: str) -> bytes:
        """The fingerprint sample of the base weight ``key`` (:func:`~..model.fingerprint_sample`)."""


class StatisticsSource(Protocol):
    """What a delta's error costs, and the order the pipeline's steps go through the deltas."""

    def measure(self, pipeline: Pipeline) -> None:
        """Call ``pipeline.measure(keys, statistics)`` for every group of deltas not yet in the journal."""

    def compress(self, pipeline: Pipeline, kept: dict[str, dict]) -> None:
        """Compress every ``kept`` delta (``pipeline.compress``) and record each group (``journal.save_block``)."""

    def finish(self, pipeline: Pipeline, compressed: dict[str, CompressedDelta]) -> tuple[dict[str, CompressedDelta], list[float]]:
        """The compressed deltas, trained further or as they are, and the training's losses."""


class Pipeline:
    """Measure, choose, compress and assemble the deltas of ``deltas`` into a SkillPack (module docs)."""

    def __init__(self, deltas: DeltaSource, config: SkillPackConfig, journal: Journal, device: torch.device, progress: bool = True):
        self.deltas, self.config, self.journal, self.device, self.progress = deltas, config, journal, device, progress

    def conv1d(self, key: str) -> bool:
        return key.rsplit(".", 1)[0] in self.deltas.conv1d

    def _statistics(self, key: str, statistics: dict[str, ModuleStatistics]) -> Optional[ModuleStatistics]:
        stats = statistics.get(key.rsplit(".", 1)[0]) if key.endswith(".weight") else None
        return stats.to(self.device) if stats is not None else None

    def measure(self, keys: Iterable[str], statistics: dict[str, ModuleStatistics]) -> None:
        """Cost every candidate of the deltas ``keys`` under ``statistics`` (by module name; none: the
        Frobenius error), into the journal; a delta that is zero is seen but not measured."""
        journal = self.journal
        for key in keys:
            delta, journal.samples[key] = self.deltas.delta(key, self.device), self.deltas.sample(key)
            if delta.any_nonzero() if isinstance(delta, DeltaRows) else torch.count_nonzero(delta):
                journal.measured[key] = measure(key, delta, self._statistics(key, statistics), self.config,
                                                conv1d=self.conv1d(key), bases=journal.bases)
            journal.seen.add(key)
            del delta
            release_freed_memory()

    def compress(self, keys: Iterable[str], kept: dict[str, dict], statistics: dict[str, ModuleStatistics]) -> tuple[dict, dict]:
        """``(compressed, squared errors)`` of the deltas ``keys`` stored as ``kept`` says, under ``statistics``."""
        block, errors = {}, {}
        for key in keys:
            delta = self.deltas.delta(key, self.device)
            block[key] = packed = compress(key, delta, kept[key], self._statistics(key, statistics), conv1d=self.conv1d(key),
                                           basis=self.journal.bases.get(key))
            errors[key] = delta_error_sq(delta, packed, conv1d=self.conv1d(key))
            del delta
            release_freed_memory()
        return block, errors

    def bf16_bytes(self, keys: Iterable[str]) -> int:
        return sum(math.prod(self.deltas.shape(key)) * BF16_BYTES for key in keys)

    def run(self, statistics: StatisticsSource) -> SkillPackFile:
        """The pack: measured, chosen, compressed and finished as ``statistics`` says, then written
        where the journal says (and returned)."""
        deltas, journal, config = self.deltas, self.journal, self.config
        statistics.measure(self)
        journal.gather()
        measured = {key: journal.measured[key] for key in deltas.keys if key in journal.measured}
        if not measured:
            raise HfGraftError("The tuned model has the same weights as the base: there is no skill to extract.")
        bf16_bytes = self.bf16_bytes(measured)
        if journal.kept is None:  # every process chooses the same from the same measurements
            shapes = {key: deltas.shape(key) for key in measured}
            journal.kept = choose(measured, config, bf16_bytes, deltas.model_class, shapes, deltas.tied)
            journal.save()
        statistics.compress(self, journal.kept)
        journal.gather()
        recorded = journal.all_compressed()
        recorded = {key: recorded[key] for key in deltas.keys if key in recorded}
        compressed, losses = statistics.finish(self, recorded)
        errors_sq = {
            key: journal.errors_sq[key] if packed is recorded[key] else delta_error_sq(deltas.delta(key, self.device), packed, conv1d=self.conv1d(key))
            for key, packed in compressed.items()
        }
        modules = {key.rsplit(".", 1)[0] for key in compressed}
        fingerprint = fingerprint_of((name, (self._sample(f"{name}.weight"), deltas.shape(f"{name}.weight"))) for name in modules)
        pack = assemble(
            config, compressed, measured, errors_sq, bf16_bytes=bf16_bytes, model_class=deltas.model_class,
            tied_modules=deltas.tied, fingerprint=fingerprint, distill_losses=losses,
        )
        journal.finish(pack, deltas.model_class)
        return pack

    def _sample(self, key: str) -> bytes:
        sample = self.journal.samples.get(key)
        return sample if sample is not None else self.deltas.sample(key)


class BlockSweep:
    """Statistics known before measuring (``statistics`` by module name; none, the default: a data-free
    pack): the deltas measured and compressed decoder block by decoder block in the model's order, the
    blocks dealt out to the processes sharing the journal. Subclasses may refresh the statistics
    before a block is compressed (:meth:`block_statistics`) and see each compressed block (:meth:`compressed`)."""

    def __init__(self, statistics: Optional[dict[str, ModuleStatistics]] = None):
        self.statistics = statistics or {}

    def measure(self, pipeline: Pipeline) -> None:
        journal = pipeline.journal
        groups = block_groups(pipeline.deltas.keys)
        todo = [group for index, group in enumerate(groups) if journal.mine(index) and not all(key in journal.seen for key in group)]
        for group in tqdm(todo, desc="Measuring SkillPack candidates", unit="block", disable=not pipeline.progress):
            pipeline.measure(group, self.statistics)
            journal.save()

    def compress(self, pipeline: Pipeline, kept: dict[str, dict]) -> None:
        journal = pipeline.journal
        groups = block_groups([key for key in pipeline.deltas.keys if key in kept])
        todo = [(index, group) for index, group in enumerate(groups) if journal.mine(index) and index not in journal.blocks]
        for index, group in tqdm(todo, desc="Compressing SkillPack deltas", unit="block", disable=not pipeline.progress):
            block, errors = pipeline.compress(group, kept, self.block_statistics(group, kept))
            journal.save_block(index, block, errors)
            for key in group:
                journal.bases.pop(key, None)  # a factor kept by measuring, now used
            self.compressed(block)

    def block_statistics(self, keys: list[str], kept: dict[str, dict]) -> dict[str, ModuleStatistics]:
        """The statistics the block of deltas ``keys`` is compressed under."""
        return self.statistics

    def compressed(self, block: dict[str, CompressedDelta]) -> None:
        """Called with each block once it is compressed and recorded."""

    def finish(self, pipeline: Pipeline, compressed: dict[str, CompressedDelta]) -> tuple[dict[str, CompressedDelta], list[float]]:
        return compressed, []
