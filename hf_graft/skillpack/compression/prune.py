"""Magnitude pruning of a delta into a compact sparse form (GraftLLM's treatment of embeddings).

Embedding and ``lm_head`` deltas touch only the rows of tokens the fine-tune saw, so they are
sparse rather than low-rank: GraftLLM (arXiv 2505.18502) keeps their largest-magnitude entries.
The kept values are stored in fp16 in increasing flat-index order, and their positions in whichever
of two encodings is smaller: int32 flat indices (4 bytes per kept entry) or a bitmap of one bit per
entry (``numel / 8`` bytes). Indices win below a density of 1/32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...errors import HfGraftError
from ...validation import check_fraction, meta_int, meta_keys, meta_shape, stored_tensor
from .bitpack import pack_bits, packed_size, unpack_bits

__all__ = ["SparseDelta", "kept_count", "prune", "sparse_format", "sparse_nbytes"]

SparseFormat = Literal["indices", "bitmap"]

_INT32_LIMIT = 2**31
"""Flat indices are int32: a tensor with more entries can only use the bitmap."""


def kept_count(numel: int, keep_fraction: float) -> int:
    """How many entries :func:`prune` keeps: ``keep_fraction * numel`` rounded to the nearest int."""
    return math.floor(keep_fraction * numel + 0.5)


def sparse_format(numel: int, count: int) -> SparseFormat:
    """The smaller position encoding for ``count`` kept entries out of ``numel`` (bitmap on a tie)."""
    if numel <= _INT32_LIMIT and 4 * count < packed_size(numel, 1):
        return "indices"
    return "bitmap"


def sparse_nbytes(numel: int, count: int) -> int:
    """Exact bytes a :class:`SparseDelta` of ``count`` kept entries out of ``numel`` stores."""
    positions = 4 * count if sparse_format(numel, count) == "indices" else packed_size(numel, 1)
    return 2 * count + positions


@dataclass(frozen=True)
class SparseDelta:
    """The kept entries of a delta of ``shape``: fp16 ``values`` and either ``indices`` or a ``bitmap``.

    ``values`` are in increasing flat-index order; ``indices`` (int32) are those flat indices,
    ``bitmap`` (uint8) packs one bit per entry of the flattened delta, set where one is kept.
    """

    shape: tuple[int, ...]
    values: torch.Tensor
    indices: torch.Tensor | None = None
    bitmap: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def format(self) -> SparseFormat:
        return "indices" if self.indices is not None else "bitmap"

    def to_dense(self) -> torch.Tensor:
        """The float32 delta: kept entries in place, zeros elsewhere."""
        dense = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        if self.indices is not None:
            dense[self.indices.long()] = self.values.float()
        else:
            dense[unpack_bits(self.bitmap, 1, self.numel).bool()] = self.values.float()
        return dense.reshape(self.shape)

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (of the first dimension) of :meth:`to_dense`, from the entries they hold only."""
        rows = self.shape[0] if self.shape else 1
        start, stop = max(0, start), max(start, min(rows, stop))
        width = self.numel // rows if rows else 0
        first, last = start * width, stop * width
        dense = torch.zeros(last - first, dtype=torch.float32, device=self.values.device)
        if self.indices is not None:
            low, high = (int(i) for i in torch.searchsorted(self.indices, torch.tensor([first, last], dtype=torch.int32, device=self.indices.device)))
            dense[self.indices[low:high].long() - first] = self.values[low:high].float()
        else:
            aligned = first - first % 8
            marks = unpack_bits(self.bitmap[aligned // 8 :], 1, last - aligned)
            low = _popcount(self.bitmap[: aligned // 8]) + int(marks[: first - aligned].sum())
            marks = marks[first - aligned :].bool()
            dense[marks] = self.values[low : low + int(marks.sum())].float()
        return dense.reshape(stop - start, *self.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        positions = self.indices if self.indices is not None else self.bitmap
        return sum(t.numel() * t.element_size() for t in (self.values, positions))

    @property
    def meta(self) -> dict[str, Any]:
        """``{"shape", "format", "count"}``: what :meth:`from_tensors` needs to check the tensors."""
        return {"shape": list(self.shape), "format": self.format, "count": self.values.numel()}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix}.values`` (fp16) and ``{prefix}.indices`` (int32) or ``{prefix}.bitmap`` (uint8)."""
        if self.indices is not None:
            return {f"{prefix}.values": self.values, f"{prefix}.indices": self.indices}
        return {f"{prefix}.values": self.values, f"{prefix}.bitmap": self.bitmap}

    @classmethod
    def from_tensors(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> SparseDelta:
        """Rebuild from :meth:`to_tensors` output and :attr:`meta`.

        Besides shapes and dtypes it checks that indices are in range and strictly increasing, and
        that the bitmap marks exactly ``count`` entries (its padding bits clear).
        """
        what = f"sparse delta {prefix!r}"
        meta_keys(meta, ("shape", "format", "count"), what)
        shape = meta_shape(meta, "shape", what)
        numel = math.prod(shape)
        count = meta_int(meta, "count", what, 0, numel)
        values = stored_tensor(tensors, f"{prefix}.values", (count,), torch.float16)
        if meta["format"] == "indices":
            indices = stored_tensor(tensors, f"{prefix}.indices", (count,), torch.int32)
            if count and (int(indices.min()) < 0 or int(indices.max()) >= numel):
                raise HfGraftError(
                    f"SkillPack tensor '{prefix}.indices' holds indices outside [0, {numel}); the file is corrupt."
                )
            if count > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise HfGraftError(
                    f"SkillPack tensor '{prefix}.indices' is not strictly increasing; the file is corrupt."
                )
            return cls(shape, values, indices=indices)
        if meta["format"] == "bitmap":
            bitmap = stored_tensor(tensors, f"{prefix}.bitmap", (packed_size(numel, 1),), torch.uint8)
            marks = unpack_bits(bitmap, 1, 8 * bitmap.numel())
            marked, padding = int(marks[:numel].sum()), int(marks[numel:].sum())
            if marked != count or padding:
                raise HfGraftError(
                    f"SkillPack tensor '{prefix}.bitmap' marks {marked} entries (and {padding} padding bits) "
                    f"where {count} values are stored; the file is corrupt."
                )
            return cls(shape, values, bitmap=bitmap)
        raise HfGraftError(f"Metadata 'format' of {what} must be 'indices' or 'bitmap', got {meta['format']!r}.")


_BITS_SET = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


def _popcount(data: torch.Tensor) -> int:
    """Set bits in a uint8 tensor."""
    return int(torch.bincount(data, minlength=256).cpu() @ _BITS_SET) if data.numel() else 0


def prune(delta: torch.Tensor, keep_fraction: float, *, scores: torch.Tensor | None = None) -> SparseDelta:
    """Keep the :func:`kept_count` largest-magnitude entries of ``delta`` (ties broken arbitrarily).

    ``scores`` (same shape) ranks the entries instead of their magnitude, e.g. what losing each
    one costs the model.

    Raises :class:`~hf_graft.errors.HfGraftError` for a non-float or non-finite delta, a
    ``keep_fraction`` outside ``(0, 1]``, or kept values beyond the fp16 range.
    """
    if not (isinstance(delta, torch.Tensor) and delta.is_floating_point()):
        raise HfGraftError("prune needs a floating-point tensor.")
    check_fraction(keep_fraction, "keep_fraction")
    flat = delta.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise HfGraftError("prune: the delta holds NaN or infinite values.")
    count = kept_count(flat.numel(), keep_fraction)
    ranking = flat.abs() if scores is None else scores.detach().reshape(-1).float()
    if ranking.shape != flat.shape:
        raise HfGraftError(f"prune: scores of shape {tuple(scores.shape)} do not match the delta's {tuple(delta.shape)}.")
    positions = torch.topk(ranking, count, sorted=False).indices.sort().values
    values = flat[positions].half()
    if not torch.isfinite(values).all():
        raise HfGraftError("prune: kept values exceed the float16 range.")
    shape = tuple(delta.shape)
    if sparse_format(flat.numel(), count) == "indices":
        return SparseDelta(shape, values, indices=positions.int())
    marks = torch.zeros(flat.numel(), dtype=torch.uint8, device=flat.device)
    marks[positions] = 1
    return SparseDelta(shape, values, bitmap=pack_bits(marks, 1))
