"""Group-wise asymmetric quantization of low-rank factors, uniform or mixed precision per column block.

A factor is a ``[rows, rank]`` matrix whose columns are singular vectors scaled by the square root
of their singular value. Each column is cut into groups of ``group_size`` consecutive rows, and each
group gets its own fp16 ``scale`` and fp16 ``zero`` (the value code 0 decodes to):
``value ~= code * scale + zero`` with ``code`` in ``[0, 2**bits - 1]``. Scales per column matter
because the columns differ in magnitude by their singular values; the zero makes the grid fit the
group's own ``[min, max]`` rather than a symmetric range around 0.

Mixed precision follows Delta-CoMe (Ping et al., 2024), which GraftLLM (arXiv 2505.18502) uses for
its SkillPacks: a delta's singular values decay, so the first columns carry most of its energy and
get the most bits. :data:`DEFAULT_SCHEME` spends 8 bits on the top 2 singular vectors, 4 on the
next 6 and 2 on the rest.

Codes are really bit-packed (:mod:`.bitpack`), so a 2-bit column costs a quarter byte per entry
plus ``4 / group_size`` bytes of scale and zero per entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import HfGraftError
from ...validation import check_int, meta_int, meta_keys, meta_shape, stored_tensor
from .bitpack import pack_bits, packed_size, unpack_bits

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_SCHEME",
    "MixedPrecisionFactor",
    "QuantizedMatrix",
    "Scheme",
    "quantize",
    "quantize_factor",
    "quantized_nbytes",
    "encode",
    "fitted_grid",
    "group_grid",
    "resolve_scheme",
]

Scheme = Sequence[tuple[int, int | None]]
"""Bit widths over consecutive column blocks: ``(bits, columns)`` pairs, the last ``columns`` may be
``None`` for "all remaining columns". See :func:`resolve_scheme`."""

DEFAULT_SCHEME: tuple[tuple[int, int | None], ...] = ((8, 2), (4, 6), (2, None))
"""Delta-CoMe-style 8/4/2 mix: top 2 singular vectors at 8 bits, next 6 at 4, the rest at 2."""

DEFAULT_GROUP_SIZE = 128
"""Rows per scale/zero pair: 4 bytes per 128 entries add 0.25 bit per entry to every width."""


def quantized_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Exact bytes :func:`quantize` stores for a ``[rows, cols]`` matrix: codes, fp16 scales and zeros."""
    groups = -(-rows // group_size)
    return packed_size(rows * cols, bits) + 2 * 2 * groups * cols


@dataclass(frozen=True)
class QuantizedMatrix:
    """A ``[rows, cols]`` matrix quantized to ``bits`` bits in groups of ``group_size`` rows per column.

    ``packed`` holds the codes in row-major order, bit-packed; ``scales`` and ``zeros`` are fp16
    ``[groups, cols]`` with ``groups = ceil(rows / group_size)``, the last group possibly shorter.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    shape: tuple[int, int]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[rows, cols]`` matrix the codes stand for."""
        rows, cols = self.shape
        result = torch.empty(rows, cols, device=self.packed.device)
        for start, stop in _row_spans(rows, cols):  # bounded temporaries on large matrices
            result[start:stop] = self.dequantize_rows(start, stop)
        return result

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`dequantize`, decoded from their own codes only."""
        rows, cols = self.shape
        start, stop = max(0, start), min(rows, stop)
        first, last = start * cols, max(start, stop) * cols
        aligned = first - first % 8  # eight codes always end on a byte boundary
        codes = unpack_bits(self.packed[aligned * self.bits // 8 :], self.bits, last - aligned)[first - aligned :]
        scales, zeros = (_rows_of(grid, start, stop, self.group_size) for grid in (self.scales, self.zeros))
        return codes.reshape(-1, cols).float() * scales + zeros

    def dequantize_columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of :meth:`dequantize`."""
        rows, cols = self.shape
        codes = unpack_bits(self.packed, self.bits, rows * cols).reshape(rows, cols)[:, start:stop]
        scales, zeros = self.scales[:, start:stop], self.zeros[:, start:stop]
        result = torch.empty(rows, codes.shape[1], device=self.packed.device)
        for first, last in _row_spans(rows, max(1, codes.shape[1])):
            grid = (_rows_of(g, first, last, self.group_size) for g in (scales, zeros))
            result[first:last] = codes[first:last].float() * next(grid) + next(grid)
        return result

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (what :meth:`to_tensors` writes, without file headers)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))

    @property
    def meta(self) -> dict[str, Any]:
        """The JSON-able description :meth:`from_tensors` needs beside the tensors."""
        return {"bits": self.bits, "shape": list(self.shape), "group_size": self.group_size}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix}.packed`` (uint8), ``{prefix}.scales`` and ``{prefix}.zeros`` (fp16)."""
        return {f"{prefix}.packed": self.packed, f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros}

    @classmethod
    def from_tensors(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> QuantizedMatrix:
        """Rebuild from :meth:`to_tensors` output and :attr:`meta`, checking every shape and dtype."""
        what = f"quantized matrix {prefix!r}"
        meta_keys(meta, ("bits", "shape", "group_size"), what)
        bits = meta_int(meta, "bits", what, 1, 8)
        rows, cols = meta_shape(meta, "shape", what, ndim=2)
        group_size = meta_int(meta, "group_size", what, 1)
        groups = -(-rows // group_size)
        return cls(
            packed=stored_tensor(tensors, f"{prefix}.packed", (packed_size(rows * cols, bits),), torch.uint8),
            scales=stored_tensor(tensors, f"{prefix}.scales", (groups, cols), torch.float16),
            zeros=stored_tensor(tensors, f"{prefix}.zeros", (groups, cols), torch.float16),
            bits=bits,
            shape=(rows, cols),
            group_size=group_size,
        )


def quantize(
    matrix: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE, *, clip: bool = False
) -> QuantizedMatrix:
    """Quantize a 2-D float ``matrix`` to ``bits`` bits with one scale and zero per ``group_size`` rows per column.

    The zero is the group minimum rounded down to fp16 and the scale ``(max - zero) / (2**bits - 1)``
    rounded up, so the grid covers the whole group and every entry is within ``scale / 2`` of its
    decoded value. With ``clip`` the grid of each group is the one of :func:`fitted_grid` instead
    (least squared error; outliers may be clipped). Raises :class:`~hf_graft.errors.HfGraftError` for a non-2-D or non-finite input,
    a bad width or group size, or values beyond the fp16 range of the scales.
    """
    if not (
        isinstance(matrix, torch.Tensor) and matrix.dim() == 2 and matrix.is_floating_point() and matrix.numel()
    ):
        raise HfGraftError("quantize needs a non-empty 2-D floating-point tensor.")
    check_int(bits, "bits", 1, 8)
    check_int(group_size, "group_size", 1)
    values = matrix.detach().float()
    if not torch.isfinite(values).all():
        raise HfGraftError("quantize: the matrix holds NaN or infinite values.")
    rows, cols = values.shape
    groups = -(-rows // group_size)
    # Padding rows repeat the last row, which lies in the last group: no group's min or max moves.
    padding = groups * group_size - rows
    padded = torch.cat([values, values[-1:].expand(padding, cols)]) if padding else values
    grouped = padded.reshape(groups, group_size, cols)
    if clip:
        scales, zeros = fitted_grid(grouped, bits)
    else:
        scales, zeros = group_grid(grouped.amin(dim=1), grouped.amax(dim=1), bits)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=values.device)
    for start, stop in _row_spans(rows, cols):
        expanded_scales, expanded_zeros = (_rows_of(grid, start, stop, group_size) for grid in (scales, zeros))
        codes[start:stop] = encode(values[start:stop], expanded_scales, expanded_zeros, bits)
    return QuantizedMatrix(
        packed=pack_bits(codes, bits),
        scales=scales,
        zeros=zeros,
        bits=bits,
        shape=(rows, cols),
        group_size=group_size,
    )


def _row_spans(rows: int, cols: int, max_bytes: int = 32 << 20) -> list[tuple[int, int]]:
    """``(start, stop)`` row spans of about ``max_bytes`` of float32 each (a group may span several)."""
    step = max(1, max_bytes // (4 * cols))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _rows_of(grid: torch.Tensor, start: int, stop: int, group_size: int) -> torch.Tensor:
    """The float32 ``[stop - start, cols]`` values of a ``[groups, cols]`` grid for rows ``start:stop``."""
    index = torch.arange(start, stop, device=grid.device) // group_size
    return grid.float()[index] if grid.dtype != torch.float32 else grid[index]


def group_grid(minimum: torch.Tensor, maximum: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scales, zeros)`` of grids that cover ``[minimum, maximum]`` elementwise with ``2**bits`` levels.

    The zero is the minimum rounded down to fp16 and the scale ``(maximum - zero) / (2**bits - 1)``
    rounded up, so every value in the range is within ``scale / 2`` of a level.
    """
    zeros = _to_fp16(minimum.float(), toward=-float("inf"))
    scales = _to_fp16((maximum.float() - zeros.float()) / ((1 << bits) - 1), toward=float("inf"))
    if not (torch.isfinite(zeros).all() and torch.isfinite(scales).all()):
        raise HfGraftError("quantize: the values exceed the float16 range of the scales and zeros.")
    return scales, zeros


#: Entries :func:`fitted_grid` decodes at once (candidates times values).
FITTED_GRID_CHUNK = 1 << 18

#: Shrink factors of a group's range tried by :func:`fitted_grid` (GPTQ's ``mse`` grid search).
CLIP_RATIOS = tuple(1.0 - 0.05 * step for step in range(15))


def fitted_grid(grouped: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scales, zeros)`` ``[groups, cols]`` of the grids with the least squared error on ``grouped``.

    ``grouped`` is ``[groups, group_size, cols]`` (padding rows repeat a real row, so they only
    reweigh it slightly). Candidates are the ``[min, max]`` range shrunk toward zero by each of
    :data:`CLIP_RATIOS`, as GPTQ's grid search does; at 1 bit also the two-means grid (the mean of
    the values below and above the group mean), the best 2-level quantizer for a split at the mean.
    At low widths clipping a few outliers lowers the error of all the other entries. All
    candidates are tried at once, vectorized.
    """
    groups, size, cols = grouped.shape
    # A few columns at a time bound the temporaries (the values and one decoded candidate) to ~64 MB.
    step = max(1, (64 << 20) // (4 * 2 * groups * size))
    if cols > step:
        parts = [_fitted_grid(grouped[:, :, start : start + step], bits) for start in range(0, cols, step)]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    return _fitted_grid(grouped, bits)


def _fitted_grid(grouped: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = grouped.float()
    low, high = values.amin(dim=1), values.amax(dim=1)
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=values.device)[:, None, None]
    scales, zeros = group_grid(low[None] * ratios, high[None] * ratios, bits)
    if bits == 1:
        mean = values.mean(dim=1, keepdim=True)
        below, above = values <= mean, values > mean
        low_mean = (values * below).sum(1) / below.sum(1).clamp_min(1)
        high_mean = torch.where(above.any(1), (values * above).sum(1) / above.sum(1).clamp_min(1), low_mean)
        two_scales, two_zeros = _two_level_grid(low_mean, high_mean)
        scales, zeros = torch.cat([scales, two_scales[None]]), torch.cat([zeros, two_zeros[None]])
    # Each candidate's squared error (what encode() then decoding gives), as many candidates at once as
    # fit in a cache-sized buffer: small groups are decoded all together, large ones one at a time.
    errors = torch.empty(len(scales), *low.shape, device=values.device)
    together = min(len(scales), max(1, FITTED_GRID_CHUNK // values.numel()))
    buffer = torch.empty(together, *values.shape, device=values.device)
    for start in range(0, len(scales), together):
        part = slice(start, start + together)
        scale, zero = scales[part].float()[:, :, None, :], zeros[part].float()[:, :, None, :]
        work = torch.sub(values[None], zero, out=buffer[: len(scale)])
        work.div_(torch.where(scale > 0, scale, torch.ones_like(scale))).round_().clamp_(0, (1 << bits) - 1)
        torch.sum(work.mul_(scale).add_(zero).sub_(values[None]).square_(), dim=2, out=errors[part])
    best = errors.argmin(dim=0, keepdim=True)  # [1, groups, cols]
    return scales.gather(0, best)[0], zeros.gather(0, best)[0]


def _two_level_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scales, zeros)`` whose two levels are ``low`` and ``high`` (rounded to fp16)."""
    zeros = low.half()
    scales = (high - zeros.float()).clamp_min(0).half()
    if not (torch.isfinite(zeros).all() and torch.isfinite(scales).all()):
        raise HfGraftError("quantize: the values exceed the float16 range of the scales and zeros.")
    return scales, zeros


def encode(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``values`` on the grids ``scales``, ``zeros`` (broadcast to ``values``'s shape)."""
    scales, zeros = scales.float(), zeros.float()
    # A zero scale means a constant group equal to its zero: code 0 decodes it exactly.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round((values - zeros) / divisor).clamp_(0, (1 << bits) - 1).to(torch.uint8)


def _to_fp16(values: torch.Tensor, toward: float) -> torch.Tensor:
    """``values`` in fp16, rounded toward ``toward`` (+inf or -inf) where fp16 cannot hold them exactly."""
    rounded = values.half()
    overshoot = rounded.float() > values if toward < 0 else rounded.float() < values
    return torch.where(overshoot, torch.nextafter(rounded, torch.full_like(rounded, toward)), rounded)


def resolve_scheme(scheme: Scheme, rank: int) -> tuple[tuple[int, int], ...]:
    """Turn ``scheme`` into ``(bits, columns)`` blocks that cover exactly ``rank`` columns.

    Blocks are taken in order; the one that reaches ``rank`` is cut short and later ones are
    dropped, so one scheme serves every rank (column ``j`` always gets the same width). A final
    ``(bits, None)`` takes all remaining columns. Raises
    :class:`~hf_graft.errors.HfGraftError` for a malformed scheme or one that covers fewer than
    ``rank`` columns.
    """
    blocks: list[tuple[int, int]] = []
    remaining = rank
    for position, entry in enumerate(scheme):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise HfGraftError(f"Scheme entries must be (bits, columns) pairs, got {entry!r}.")
        bits, columns = entry
        check_int(bits, f"Scheme entry {entry!r}: bits", 1, 8)
        if columns is None:
            if position != len(scheme) - 1:
                raise HfGraftError(f"Scheme entry {entry!r}: only the last block may take the remaining columns.")
            columns = remaining
        else:
            check_int(columns, f"Scheme entry {entry!r}: columns (or None for the rest)", 1)
        taken = min(columns, remaining)
        if taken:
            blocks.append((bits, taken))
        remaining -= taken
    if remaining:
        raise HfGraftError(
            f"Scheme {list(scheme)!r} covers {rank - remaining} of {rank} columns; "
            "give more columns or end it with (bits, None)."
        )
    return tuple(blocks)


@dataclass(frozen=True)
class MixedPrecisionFactor:
    """A ``[rows, rank]`` factor quantized in consecutive column blocks of different bit widths."""

    blocks: tuple[QuantizedMatrix, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks[0].shape[0], sum(block.shape[1] for block in self.blocks))

    @property
    def scheme(self) -> tuple[tuple[int, int], ...]:
        """The resolved ``(bits, columns)`` blocks."""
        return tuple((block.bits, block.shape[1]) for block in self.blocks)

    @property
    def group_size(self) -> int:
        return self.blocks[0].group_size

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[rows, rank]`` factor."""
        return torch.cat([block.dequantize() for block in self.blocks], dim=1)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`dequantize`."""
        return torch.cat([block.dequantize_rows(start, stop) for block in self.blocks], dim=1)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return sum(block.nbytes for block in self.blocks)

    @property
    def meta(self) -> dict[str, Any]:
        """``{"shape", "scheme", "group_size"}``: enough to rebuild every block's metadata."""
        return {
            "shape": list(self.shape),
            "scheme": [list(block) for block in self.scheme],
            "group_size": self.group_size,
        }

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Block ``i`` as ``{prefix}.{i}.packed`` / ``.scales`` / ``.zeros``."""
        tensors: dict[str, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            tensors.update(block.to_tensors(f"{prefix}.{index}"))
        return tensors

    @classmethod
    def from_tensors(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> MixedPrecisionFactor:
        """Rebuild from :meth:`to_tensors` output and :attr:`meta`, checking every block."""
        what = f"mixed-precision factor {prefix!r}"
        meta_keys(meta, ("shape", "scheme", "group_size"), what)
        rows, cols = meta_shape(meta, "shape", what, ndim=2)
        group_size = meta_int(meta, "group_size", what, 1)
        scheme = meta["scheme"]
        if not (isinstance(scheme, list) and scheme) or resolve_scheme(scheme, cols) != tuple(map(tuple, scheme)):
            raise HfGraftError(
                f"Metadata 'scheme' of {what} must list [bits, columns] blocks covering exactly {cols} columns, "
                f"got {scheme!r}."
            )
        return cls(
            tuple(
                QuantizedMatrix.from_tensors(
                    f"{prefix}.{index}",
                    tensors,
                    {"bits": bits, "shape": [rows, columns], "group_size": group_size},
                )
                for index, (bits, columns) in enumerate(scheme)
            )
        )


def quantize_factor(
    factor: torch.Tensor, scheme: Scheme = DEFAULT_SCHEME, group_size: int = DEFAULT_GROUP_SIZE, *, clip: bool = False
) -> MixedPrecisionFactor:
    """Quantize the columns of a ``[rows, rank]`` factor block by block as ``scheme`` says.

    Column order matters: pass columns by decreasing singular value so the widest codes go to the
    directions that carry the most energy. ``clip`` fits each group's grid (:func:`quantize`).
    """
    if not isinstance(factor, torch.Tensor) or factor.dim() != 2 or factor.shape[1] == 0:
        raise HfGraftError("quantize_factor needs a 2-D tensor with at least one column.")
    blocks, start = [], 0
    for bits, columns in resolve_scheme(scheme, factor.shape[1]):
        blocks.append(quantize(factor[:, start : start + columns], bits, group_size, clip=clip))
        start += columns
    return MixedPrecisionFactor(tuple(blocks))
