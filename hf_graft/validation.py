"""Checks of values read from files and arguments: each failure is one :class:`~hf_graft.errors.HfGraftError` naming the value.

:func:`stored_tensor` and the ``meta_*`` readers are what every ``from_tensors`` of the SkillPack
format uses, so a file with a missing, mis-shaped or mis-typed tensor, or a metadata entry of the
wrong kind, fails naming it; :func:`is_int` and :func:`is_number` are the predicates the file
readers' own checks use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import HfGraftError

__all__ = ["check_fraction", "check_int", "is_int", "is_number", "meta_int", "meta_keys", "meta_shape", "stored_tensor"]


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stored_tensor(
    tensors: Mapping[str, torch.Tensor], name: str, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """``tensors[name]``, after checking that it exists and has exactly ``shape`` and ``dtype``."""
    tensor = tensors.get(name)
    if not isinstance(tensor, torch.Tensor):
        raise HfGraftError(f"SkillPack tensor {name!r} is missing; the file is incomplete or from another model.")
    if tuple(tensor.shape) != tuple(shape):
        raise HfGraftError(
            f"SkillPack tensor {name!r} has shape {tuple(tensor.shape)} where {tuple(shape)} expected; "
            "the file is corrupt or its metadata belongs to another file."
        )
    if tensor.dtype != dtype:
        raise HfGraftError(
            f"SkillPack tensor {name!r} has dtype {tensor.dtype} where {dtype} expected; the file is corrupt."
        )
    return tensor


def meta_keys(meta: Any, keys: Sequence[str], what: str) -> Mapping[str, Any]:
    """``meta`` itself, after checking that it is a mapping with exactly ``keys``."""
    if not isinstance(meta, Mapping) or set(meta) != set(keys):
        found = sorted(meta) if isinstance(meta, Mapping) else type(meta).__name__
        raise HfGraftError(f"Metadata of {what} must have the keys {sorted(keys)}, got {found}.")
    return meta


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value``, checked to be an int (not a bool) in ``[low, high]``; ``name`` says what it is."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise HfGraftError(f"{name} must be an int {bounds}, got {value!r}.")
    return value


def check_fraction(value: Any, name: str) -> float:
    """``value``, checked to be a real number in ``(0, 1]``; ``name`` says what it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise HfGraftError(f"{name} must be a number in (0, 1], got {value!r}.")
    return float(value)


def meta_int(meta: Mapping[str, Any], key: str, what: str, low: int, high: int | None = None) -> int:
    """The int ``meta[key]``, checked to lie in ``[low, high]``."""
    return check_int(meta[key], f"Metadata {key!r} of {what}", low, high)


def meta_shape(meta: Mapping[str, Any], key: str, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """The shape ``meta[key]``: a list of non-negative ints, of length ``ndim`` when given."""
    value = meta[key]
    if not (
        isinstance(value, (list, tuple))
        and all(is_int(d) and d >= 0 for d in value)
        and (ndim is None or len(value) == ndim)
    ):
        dims = f"{ndim} " if ndim is not None else ""
        raise HfGraftError(f"Metadata {key!r} of {what} must be a list of {dims}non-negative ints, got {value!r}.")
    return tuple(value)
