"""Large deltas measured, compressed and checked a block of rows at a time, never whole.

The embedding and head of a large vocabulary are the deltas that do not fit beside the rest
(Llama-3's are 128256 x 4096: 2 GiB each in float32). A 2-D delta of more than
:data:`LARGE_DELTA_BYTES` of float32 is handled as :class:`DeltaRows`: its shape and a function
that makes any block of its rows, from a tensor in memory or read from both checkpoints. Its
candidate formats are those that split by rows:

- ``quant`` in groups of rows: a group's grid never sees another group's rows, so quantizing
  block by block gives the codes, scales and zeros of quantizing the whole matrix;
- ``sparse``: the entries whose loss costs most, the score of the ``k``-th found exactly by
  radix selection on the bits of the float32 scores (a histogram of their high 16 bits over all
  blocks, then of the low 16 bits inside the bucket that holds it), ties kept in row-major order;
- leaving the delta out.

Low rank and one grid per whole column need the whole matrix and are not offered for these.
With the ladder's ``search="predicted"`` the candidates' costs are predicted block by block
(:mod:`.estimate`: grid errors from a sampled search, pruning costs from binned scores) instead
of compressed and decoded.
Costs split by rows too (:meth:`~.objective.ModuleStatistics.rows`). Extraction from loaded
models takes this path for the same deltas, so packs made from models and from checkpoint
files are the same file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ...errors import HfGraftError
from .allocation import ENTRY_BYTES, OMIT, Candidate, CandidateLadder, predicted_quant_costs
from .bitpack import pack_bits
from .calibrate import compress_with_statistics, gptq_upper, quantize_calibrated
from .estimate import ScoreBins
from .formats import CompressedDelta, normalize_spec, payload_size, segment_layout
from .objective import ModuleStatistics, squared_norm
from .prune import SparseDelta, kept_count, sparse_format
from .quantize import QuantizedMatrix, quantize

__all__ = ["BLOCK_BYTES", "LARGE_DELTA_BYTES", "DeltaRows", "compress_rows", "is_large", "measure_rows", "squared_error"]

#: 2-D deltas with more float32 bytes than this are worked on by row blocks.
LARGE_DELTA_BYTES = 256 << 20
#: float32 bytes of one block of rows.
BLOCK_BYTES = 16 << 20

_HIGH = 1 << 15  # non-negative float32 bit patterns have 15 high bits above the low 16
_LOW = 1 << 16


def is_large(shape, transposed: bool = False) -> bool:
    """Whether a delta of ``shape`` is worked on by row blocks (2-D, over :data:`LARGE_DELTA_BYTES`;
    a transposed ``Conv1D`` delta never: its cost does not split by its rows)."""
    return len(shape) == 2 and not transposed and 4 * math.prod(shape) > LARGE_DELTA_BYTES


@dataclass(frozen=True)
class DeltaRows:
    """A 2-D float32 delta given by its ``shape`` and ``read(start, stop)``, which makes rows ``start:stop``."""

    shape: tuple[int, int]
    read: Callable[[int, int], torch.Tensor] = field(repr=False)
    device: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, delta: Union[torch.Tensor, DeltaRows]) -> DeltaRows:
        """``delta`` itself, or a tensor's rows (views of it: nothing is copied)."""
        if isinstance(delta, DeltaRows):
            return delta
        return cls(tuple(delta.shape), lambda start, stop: delta[start:stop].float(), delta.device)

    def dim(self) -> int:
        return 2

    def blocks(self, align: int = 8) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` of about :data:`BLOCK_BYTES` each, every block but the last a multiple of ``align`` rows."""
        rows, cols = self.shape
        step = max(align, BLOCK_BYTES // (4 * cols) // align * align)
        for start in range(0, rows, step):
            block = self.read(start, min(rows, start + step))
            if not torch.isfinite(block).all():
                raise HfGraftError("The delta holds NaN or infinite values: the tuned weights are broken.")
            yield start, block

    def norm_sq(self) -> float:
        """The squared Frobenius norm."""
        return sum(squared_norm(block) for _, block in self.blocks())

    def any_nonzero(self) -> bool:
        return any(bool(torch.count_nonzero(block)) for _, block in self.blocks())

    def materialize(self) -> torch.Tensor:
        return torch.cat([block for _, block in self.blocks()])


def measure_rows(
    name: str, rows: DeltaRows, statistics: Optional[ModuleStatistics], *, sparse: bool, ladder: CandidateLadder
) -> list[Candidate]:
    """The row-wise candidates of ``ladder`` for the large delta ``name``, each measured by its cost."""
    total_rows, cols = rows.shape
    statistics = statistics or ModuleStatistics.identity(rows.shape, device=rows.device)
    sizes = list(dict.fromkeys(min(size, total_rows) for size in ladder.quant_group_sizes if size))
    quant = [(bits, size) for bits in ladder.quant_bits for size in sizes]
    fractions = list(dict.fromkeys(ladder.keep_fractions)) if sparse else []
    align = math.lcm(8, *sizes)
    predicted = ladder.search == "predicted"
    total, costs = 0.0, [0.0] * len(quant)
    histogram = _CoarseHistogram() if fractions and not predicted else None
    score_bins = ScoreBins() if fractions and predicted else None
    upper = gptq_upper(statistics.hessian) if predicted and not statistics.is_diagonal else None
    for start, block in rows.blocks(align):
        stats = statistics.rows(start, start + len(block))
        total += stats.cost(block)
        if predicted:  # every format from one pass per group size (:mod:`.estimate`)
            found = predicted_quant_costs(block, [(size, bits) for bits, size in quant], stats, upper=upper)
            for index, (bits, size) in enumerate(quant):
                if costs[index] is not None:
                    costs[index] = costs[index] + found[size, bits] if (size, bits) in found else None
        else:
            for index, (bits, size) in enumerate(quant):
                if costs[index] is None:
                    continue
                try:
                    decoded = _quantized(block, bits, size, stats).dequantize()
                except HfGraftError:
                    costs[index] = None  # e.g. a grid beyond fp16: not a candidate for this delta
                    continue
                costs[index] += stats.cost(decoded.sub_(block))
                del decoded
        if histogram is not None:
            histogram.add(_score_bits(block, stats))
        if score_bins is not None:
            score_bins.add(_score_bits(block, stats).view(torch.float32))
    candidates = [Candidate(0, total, dict(OMIT))] if ladder.allow_omit else []
    for (bits, size), cost in zip(quant, costs):
        if cost is not None:
            spec = {"kind": "quant", "bits": bits, "group_size": size}
            candidates.append(_candidate(name, spec, {**spec, "shape": [total_rows, cols]}, cost))
    if fractions:
        numel = total_rows * cols
        counts = [kept_count(numel, fraction) for fraction in fractions]
        if predicted:
            found = score_bins.costs(counts)
        else:
            found = _sparse_costs(rows, statistics, _cuts(rows, statistics, counts, align, histogram), align)
        for fraction, count, cost in zip(fractions, counts, found):
            if cost is not None:
                meta = {"kind": "sparse", "shape": [total_rows, cols], "format": sparse_format(numel, count), "count": count}
                candidates.append(_candidate(name, {"kind": "sparse", "keep_fraction": fraction}, meta, cost))
    if not candidates:
        raise HfGraftError(f"No candidate format fits the delta of {name} (shape {rows.shape}).")
    return candidates


def compress_rows(rows: DeltaRows, spec: Mapping[str, Any], statistics: Optional[ModuleStatistics]) -> CompressedDelta:
    """The large delta ``rows`` stored as ``spec``, made block by block (other formats from the whole delta)."""
    spec = normalize_spec(spec, rows.shape)
    statistics = statistics or ModuleStatistics.identity(rows.shape, device=rows.device)
    if spec["kind"] == "quant" and "rank" not in spec:
        parts = [_quantized(block, spec["bits"], spec["group_size"], statistics.rows(start, start + len(block)))
                 for start, block in rows.blocks(math.lcm(8, spec["group_size"]))]
        quant = QuantizedMatrix(
            packed=torch.cat([part.packed for part in parts]), scales=torch.cat([part.scales for part in parts]),
            zeros=torch.cat([part.zeros for part in parts]), bits=spec["bits"], shape=rows.shape, group_size=spec["group_size"],
        )
        return CompressedDelta("quant", rows.shape, quant=quant)
    if spec["kind"] == "sparse":
        count = kept_count(math.prod(rows.shape), spec["keep_fraction"])
        return CompressedDelta("sparse", rows.shape, sparse=_pruned(rows, statistics, count))
    return compress_with_statistics(rows.materialize(), spec, statistics)


def squared_error(rows: DeltaRows, packed: CompressedDelta) -> float:
    """``||delta - packed.delta()||_F^2``, block by block."""
    return sum(
        squared_norm(packed.delta_rows(start, start + len(block)).to(block.device).sub_(block))
        for start, block in rows.blocks()
    )


def _quantized(block: torch.Tensor, bits: int, group_size: int, statistics: ModuleStatistics) -> QuantizedMatrix:
    """A block quantized as its rows are within the whole matrix (fitted grids, or GPTQ over correlated inputs)."""
    if statistics.is_diagonal:
        return quantize(block, bits, group_size, clip=True)
    return quantize_calibrated(block, bits, group_size, statistics)


def _candidate(name: str, spec: dict, meta: dict, cost: float) -> Candidate:
    return Candidate(payload_size(segment_layout(meta)) + ENTRY_BYTES, cost, spec)


def _score_bits(block: torch.Tensor, statistics: ModuleStatistics) -> torch.Tensor:
    """The int32 bit patterns of each entry's score ``f_i H_jj dW_ij^2``, ordered as the scores are."""
    scores = block.square().mul_(statistics.row_weights[:, None]).mul_(statistics.diagonal[None, :])
    return scores.abs_().view(torch.int32)  # non-negative (+0.0 for -0.0): bit order is value order


class _CoarseHistogram:
    """How many scores fall in each bucket of their high 16 bits."""

    def __init__(self):
        self.counts: Optional[torch.Tensor] = None

    def add(self, bits: torch.Tensor) -> None:
        found = torch.bincount((bits >> 16).reshape(-1), minlength=_HIGH).cpu()
        self.counts = found if self.counts is None else self.counts + found


@dataclass(frozen=True)
class _Cut:
    """Keep the entries whose score bits exceed ``bits``, and the first ``ties`` equal to it."""

    bits: int
    ties: int


def _cuts(rows: DeltaRows, statistics: ModuleStatistics, counts: list[int], align: int,
          histogram: Optional[_CoarseHistogram] = None) -> list[Optional[_Cut]]:
    """For each count ``k``, the cut that keeps exactly the ``k`` highest scores (``None`` for ``k = 0``)."""
    if histogram is None:
        histogram = _CoarseHistogram()
        for start, block in rows.blocks(align):
            histogram.add(_score_bits(block, statistics.rows(start, start + len(block))))
    at_least = histogram.counts.flip(0).cumsum(0).flip(0)  # at_least[b]: scores in buckets >= b
    buckets = {}
    for count in counts:
        if count:
            bucket = int(torch.nonzero(at_least >= count).max())
            buckets[count] = (bucket, int(at_least[bucket + 1]) if bucket + 1 < _HIGH else 0)
    fine = {bucket: torch.zeros(_LOW, dtype=torch.int64) for bucket, _ in buckets.values()}
    if fine:
        for start, block in rows.blocks(align):
            bits = _score_bits(block, statistics.rows(start, start + len(block))).reshape(-1)
            high = bits >> 16
            for bucket, counts_low in fine.items():
                counts_low += torch.bincount(bits[high == bucket] & 0xFFFF, minlength=_LOW).cpu()
    cuts = []
    for count in counts:
        if not count:
            cuts.append(None)
            continue
        bucket, above = buckets[count]
        within = fine[bucket].flip(0).cumsum(0).flip(0)
        low = int(torch.nonzero(within >= count - above).max())
        strictly = above + (int(within[low + 1]) if low + 1 < _LOW else 0)
        cuts.append(_Cut((bucket << 16) | low, count - strictly))
    return cuts


def _kept(bits: torch.Tensor, cut: Optional[_Cut], tied_before: int) -> tuple[torch.Tensor, int]:
    """The kept entries of one block (a bool mask) and the ties seen once it is done."""
    if cut is None:
        return torch.zeros_like(bits, dtype=torch.bool), tied_before
    kept = bits > cut.bits
    equal = bits == cut.bits
    tied = int(equal.sum())
    if tied and tied_before < cut.ties:
        order = equal.reshape(-1).cumsum(0).reshape(equal.shape) + tied_before
        kept |= equal & (order <= cut.ties)
    return kept, tied_before + tied


def _sparse_costs(rows: DeltaRows, statistics: ModuleStatistics, cuts: list, align: int) -> list[Optional[float]]:
    """Each cut's cost: the dropped entries' and the fp16 rounding of the kept ones (``None``: beyond fp16)."""
    costs, tied = [0.0] * len(cuts), [0] * len(cuts)
    for start, block in rows.blocks(align):
        stats = statistics.rows(start, start + len(block))
        bits = _score_bits(block, stats)
        for index, cut in enumerate(cuts):
            if costs[index] is None:
                continue
            kept, tied[index] = _kept(bits, cut, tied[index])
            decoded = torch.where(kept, block.half().float(), 0.0)
            if not torch.isfinite(decoded).all():
                costs[index] = None
                continue
            costs[index] += stats.cost(decoded.sub_(block))
            del decoded, kept
    return costs


def _pruned(rows: DeltaRows, statistics: ModuleStatistics, count: int) -> SparseDelta:
    """The ``count`` entries of highest score, in the layout :func:`~.prune.prune` stores."""
    numel, cols = math.prod(rows.shape), rows.shape[1]
    cut = _cuts(rows, statistics, [count], 8)[0]
    indices = sparse_format(numel, count) == "indices"
    values, positions, tied = [], [], 0
    for start, block in rows.blocks():
        kept, tied = _kept(_score_bits(block, statistics.rows(start, start + len(block))), cut, tied)
        values.append(block[kept].half())
        flat = kept.reshape(-1)
        positions.append((torch.nonzero(flat).reshape(-1) + start * cols).int() if indices else pack_bits(flat.to(torch.uint8), 1))
    values = torch.cat(values)
    if not torch.isfinite(values).all():
        raise HfGraftError("prune: kept values exceed the float16 range.")
    if indices:
        return SparseDelta(rows.shape, values, indices=torch.cat(positions))
    return SparseDelta(rows.shape, values, bitmap=torch.cat(positions))
