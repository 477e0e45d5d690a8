"""Bit-packing of small unsigned integer codes.

Quantized singular vectors hold 1- to 8-bit codes; storing each in a byte would waste up to 7/8
of the file. :func:`pack_bits` lays the codes out as one little-endian bitstream: code ``i``
occupies bits ``[i * bits, (i + 1) * bits)``, and bit ``k`` of the stream is bit ``k % 8`` of byte
``k // 8``. ``n`` codes therefore take exactly ``ceil(n * bits / 8)`` bytes, whatever the width.
Widths that divide 8 (1, 2, 4, 8) never straddle a byte and are packed with byte-wide shifts;
3, 5, 6 and 7 go through 64-bit words of eight codes (``8 * bits`` bits, a whole number of bytes).
"""

from __future__ import annotations

import torch

from ...errors import HfGraftError
from ...validation import check_int

__all__ = ["pack_bits", "packed_size", "unpack_bits"]


def packed_size(count: int, bits: int) -> int:
    """The number of bytes :func:`pack_bits` returns for ``count`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-count * bits // 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (uint8 codes below ``2**bits``, any shape, read flattened) into a 1-D uint8 tensor.

    Raises :class:`~hf_graft.errors.HfGraftError` (a ``ValueError``) if ``values`` is not uint8,
    ``bits`` is not in 1..8, or a code does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    if not isinstance(values, torch.Tensor) or values.dtype != torch.uint8:
        kind = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise HfGraftError(f"pack_bits needs a uint8 tensor of codes, got {kind}; convert with .to(torch.uint8).")
    flat = values.reshape(-1)
    largest = int(flat.max()) if flat.numel() else 0
    if largest >= 1 << bits:
        raise HfGraftError(f"pack_bits: code {largest} does not fit in {bits} bits (codes must be < {1 << bits}).")
    if bits == 8:
        return flat.clone()
    packed = _pack_aligned(flat, bits) if 8 % bits == 0 else _pack_words(flat, bits)
    return packed[: packed_size(flat.numel(), bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack the first ``count`` codes of ``bits`` bits from ``packed``; returns a 1-D uint8 tensor.

    Raises :class:`~hf_graft.errors.HfGraftError` if ``packed`` is not a 1-D uint8 tensor, ``bits`` is
    not in 1..8, or ``packed`` holds fewer than ``count`` codes.
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        if isinstance(packed, torch.Tensor):
            kind = f"{packed.dtype} tensor of shape {tuple(packed.shape)}"
        else:
            kind = type(packed).__name__
        raise HfGraftError(f"unpack_bits needs a 1-D uint8 tensor, got a {kind}.")
    check_int(count, "unpack_bits: count", 0)
    if packed_size(count, bits) > packed.numel():
        raise HfGraftError(
            f"unpack_bits: {count} codes of {bits} bits need {packed_size(count, bits)} bytes, "
            f"the packed data holds {packed.numel()}; the data is truncated or count is wrong."
        )
    packed = packed[: packed_size(count, bits)]  # only the bytes that hold the codes asked for
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        return _unpack_aligned(packed, bits)[:count]
    return _unpack_words(packed, bits)[:count]


def _check_bits(bits: int) -> None:
    check_int(bits, "bits", 1, 8)


def _pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    remainder = flat.numel() % multiple
    if remainder == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(multiple - remainder)])


def _pack_aligned(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths 1, 2, 4: ``8 // bits`` codes per byte, combined with uint8 shifts (no wider temporaries)."""
    per_byte = 8 // bits
    slots = _pad(flat, per_byte).reshape(-1, per_byte)
    packed = slots[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= slots[:, slot] << (slot * bits)
    return packed


def _unpack_aligned(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
    return torch.stack(slots, dim=1).reshape(-1)


def _pack_words(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths 3, 5, 6, 7: eight codes make one ``8 * bits``-bit word, written out as ``bits`` bytes."""
    codes = _pad(flat, 8).reshape(-1, 8).to(torch.int64)
    words = codes[:, 0].clone()
    for slot in range(1, 8):
        words |= codes[:, slot] << (slot * bits)
    data = [((words >> (8 * byte)) & 0xFF).to(torch.uint8) for byte in range(bits)]
    return torch.stack(data, dim=1).reshape(-1)


def _unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    data = _pad(packed, bits).reshape(-1, bits).to(torch.int64)
    words = data[:, 0].clone()
    for byte in range(1, bits):
        words |= data[:, byte] << (8 * byte)
    mask = (1 << bits) - 1
    codes = [((words >> (slot * bits)) & mask).to(torch.uint8) for slot in range(8)]
    return torch.stack(codes, dim=1).reshape(-1)
