"""How one module's weight delta is stored in a SkillPack: the formats, their checks and their bytes.

A *spec* is a JSON-able dict naming how one delta is stored:

- ``{"kind": "quant", "bits": b, "group_size": g}``: the delta itself quantized to ``b`` bits
  (:mod:`.quantize`, grids of ``g`` rows per column), optionally with ``"rank"``, ``"scheme"`` and
  ``"residual_group_size"``: a low-rank correction of what the quantization missed.
- ``{"kind": "lowrank", "rank": r, "scheme": [[bits, columns], ...], "group_size": g}``: truncated
  SVD (:mod:`.lowrank`) with mixed-precision factors; ``scheme`` defaults to the 8/4/2 mix.
- ``{"kind": "sparse", "keep_fraction": f}``: the kept entries (:mod:`.prune`).
- ``{"kind": "dense_fp16"}``: the delta in fp16. For norms, biases and other small tensors.

:func:`compress_delta` compresses data-free (round to nearest on fitted grids);
:mod:`.calibrate` does it against real activations, and :mod:`.allocation` chooses the specs.
Each stored delta is one uint8 tensor whose segments :func:`segment_layout` describes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from ...errors import HfGraftError
from ...validation import check_fraction, check_int, meta_int, meta_keys, meta_shape, stored_tensor
from .bitpack import packed_size
from .lowrank import lowrank_factors
from .prune import SparseDelta, prune
from .quantize import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_SCHEME,
    MixedPrecisionFactor,
    QuantizedMatrix,
    quantize,
    quantize_factor,
    resolve_scheme,
)

__all__ = [
    "CompressedDelta",
    "check_meta",
    "compress_delta",
    "from_payload",
    "normalize_spec",
    "payload_size",
    "segment_layout",
    "stored_layout",
    "to_payload",
]

Kind = Literal["lowrank", "quant", "sparse", "dense_fp16"]
_SPEC_KEYS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required keys, optional keys)
    "lowrank": ({"kind", "rank"}, {"scheme", "group_size"}),
    "quant": ({"kind", "bits"}, {"group_size", "rank", "scheme", "residual_group_size"}),
    "sparse": ({"kind", "keep_fraction"}, set()),
    "dense_fp16": ({"kind"}, set()),
}


def normalize_spec(spec: Mapping[str, Any], shape: Sequence[int]) -> dict[str, Any]:
    """Check ``spec`` against a delta of ``shape`` and return it complete, defaults filled in.

    A low-rank spec comes back with its scheme resolved to ``[[bits, columns], ...]`` summing to
    the rank. Raises :class:`~hf_graft.errors.HfGraftError` for an unknown kind or key, a missing
    key, a rank beyond ``min(shape)``, a low-rank spec for a tensor that is not 2-D, or a bad value.
    """
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind not in _SPEC_KEYS:
        raise HfGraftError(f"A spec needs 'kind' set to one of {sorted(_SPEC_KEYS)}, got {spec!r}.")
    required, optional = _SPEC_KEYS[kind]
    if not required <= set(spec) <= required | optional:
        accepted = f"{sorted(required)} and optionally {sorted(optional)}" if optional else f"{sorted(required)}"
        raise HfGraftError(f"A {kind!r} spec takes the keys {accepted}, got {sorted(spec)}.")
    if kind == "dense_fp16":
        return {"kind": kind}
    if kind == "sparse":
        return {"kind": kind, "keep_fraction": check_fraction(spec["keep_fraction"], "keep_fraction")}
    if len(shape) != 2:
        raise HfGraftError(
            f"A {kind!r} spec needs a 2-D delta, this one has shape {tuple(shape)}; use 'dense_fp16'."
        )
    if kind == "quant":
        bits = check_int(spec["bits"], "bits", 1, 8)
        group_size = check_int(spec.get("group_size", DEFAULT_GROUP_SIZE), "group_size", 1)
        normalized = {"kind": kind, "bits": bits, "group_size": min(group_size, shape[0])}
        if spec.get("rank"):
            rank = check_int(spec["rank"], f"rank (at most min{tuple(shape)})", 1, min(shape))
            scheme = resolve_scheme(spec.get("scheme", DEFAULT_SCHEME), rank)
            residual_group = check_int(spec.get("residual_group_size", DEFAULT_GROUP_SIZE), "residual_group_size", 1)
            normalized.update(rank=rank, scheme=[list(block) for block in scheme], residual_group_size=residual_group)
        return normalized
    rank = check_int(spec["rank"], f"rank (at most min{tuple(shape)})", 1, min(shape))
    scheme = resolve_scheme(spec.get("scheme", DEFAULT_SCHEME), rank)
    group_size = check_int(spec.get("group_size", DEFAULT_GROUP_SIZE), "group_size", 1)
    return {"kind": kind, "rank": rank, "scheme": [list(block) for block in scheme], "group_size": group_size}


@dataclass(frozen=True)
class CompressedDelta:
    """One module's delta as stored in a SkillPack; only the fields of its ``kind`` are set.

    - ``lowrank``: ``a`` holds ``A`` transposed (``[in, rank]``, so each singular vector is a
      column with its own scales) and ``b`` holds ``B`` (``[out, rank]``); ``delta ~= B @ A``.
    - ``quant``: ``quant`` holds the delta itself, quantized in its own layout; ``a`` and ``b``,
      when set, a low-rank correction of what the quantization missed.
    - ``sparse``: ``sparse`` holds the kept entries.
    - ``dense_fp16``: ``dense`` is the delta in fp16.

    On disk every delta is *one* uint8 tensor (:meth:`to_tensors`): its segments (codes, scales,
    values, positions) laid end to end in the order :func:`segment_layout` gives, so a file holds
    one safetensors header entry per module part whatever the format.
    """

    kind: Kind
    shape: tuple[int, ...]
    a: MixedPrecisionFactor | None = None
    b: MixedPrecisionFactor | None = None
    sparse: SparseDelta | None = None
    dense: torch.Tensor | None = None
    quant: QuantizedMatrix | None = None

    def delta(self) -> torch.Tensor:
        """The reconstructed float32 delta."""
        if self.kind == "lowrank":
            a, b = self.lowrank()
            return b @ a
        if self.kind == "quant":
            dense = self.quant.dequantize()
            if self.a is not None:
                dense = dense + self.b.dequantize() @ self.a.dequantize().T
            return dense
        if self.kind == "sparse":
            return self.sparse.to_dense()
        return self.dense.float()

    def delta_rows(self, start: int, stop: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`delta`, decoded without the rest (bounded memory on large deltas).

        ``device``: where the low-rank product (most of the work) is computed and the rows returned;
        by default the device the codes are on.
        """
        if self.kind == "sparse":
            rows = self.sparse.dense_rows(start, stop)
        elif self.kind == "dense_fp16":
            rows = self.dense[start:stop].float()
        else:
            rows = self.quant.dequantize_rows(start, stop) if self.kind == "quant" else None
            if self.a is not None:
                a, b = self.a.dequantize(), self.b.dequantize_rows(start, stop)
                low_rank = b.to(device or b.device) @ a.to(device or a.device).T
                return low_rank if rows is None else rows.to(low_rank.device).add_(low_rank)
        return rows if device is None else rows.to(device)

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [rank, in], B [out, rank])`` in float32, so a layer adds ``x @ A.T @ B.T`` without ``delta()``."""
        if self.kind != "lowrank":
            raise HfGraftError(f"lowrank() needs a 'lowrank' delta, this one is {self.kind!r}.")
        return self.a.dequantize().T.contiguous(), self.b.dequantize()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensor (what :meth:`to_tensors` returns, without file headers)."""
        return sum(t.numel() * t.element_size() for t in self.segments().values())

    @property
    def meta(self) -> dict[str, Any]:
        """The JSON-able description :meth:`from_tensors` needs beside the tensors."""
        if self.kind == "lowrank":
            factor = _without(self.b.meta, "shape")
            return {"kind": self.kind, "shape": list(self.shape), "rank": self.b.shape[1], **factor}
        if self.kind == "quant":
            meta = {"kind": self.kind, "shape": list(self.shape), "bits": self.quant.bits,
                    "group_size": self.quant.group_size}
            if self.a is not None:
                meta.update(rank=self.b.shape[1], scheme=[list(block) for block in self.b.scheme],
                            residual_group_size=self.b.group_size)
            return meta
        if self.kind == "sparse":
            return {"kind": self.kind, **self.sparse.meta}
        return {"kind": self.kind, "shape": list(self.shape)}

    def segments(self) -> dict[str, torch.Tensor]:
        """The typed tensors the stored bytes are made of, by segment name (see :func:`segment_layout`)."""
        if self.kind == "lowrank":
            return {**self.a.to_tensors("A"), **self.b.to_tensors("B")}
        if self.kind == "quant":
            residual = {**self.a.to_tensors("A"), **self.b.to_tensors("B")} if self.a is not None else {}
            return {**self.quant.to_tensors("Q"), **residual}
        if self.kind == "sparse":
            return {key.lstrip("."): value for key, value in self.sparse.to_tensors("").items()}
        return {"delta": self.dense}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix: payload}``: every segment's bytes, end to end, as one 1-D uint8 tensor."""
        layout = segment_layout(self.meta)
        segments = self.segments()
        return {prefix: to_payload([segments[name] for name in layout])}

    @classmethod
    def from_tensors(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> CompressedDelta:
        """Rebuild from :meth:`to_tensors` output and :attr:`meta`, checking the payload and every segment."""
        what = f"compressed delta {prefix!r}"
        meta = check_meta(meta, repr(prefix))
        layout = segment_layout(meta)
        payload = stored_tensor(tensors, prefix, (payload_size(layout),), torch.uint8)
        segments = from_payload(payload, layout)
        kind = meta["kind"]
        if kind in ("lowrank", "quant"):
            rows, cols = meta_shape(meta, "shape", what, ndim=2)
            factors = {}
            if "rank" in meta:
                group_size = meta["group_size"] if kind == "lowrank" else meta["residual_group_size"]
                factor = {"scheme": meta["scheme"], "group_size": group_size}
                factors = {
                    "a": MixedPrecisionFactor.from_tensors("A", segments, {**factor, "shape": [cols, meta["rank"]]}),
                    "b": MixedPrecisionFactor.from_tensors("B", segments, {**factor, "shape": [rows, meta["rank"]]}),
                }
            if kind == "lowrank":
                return cls(kind, (rows, cols), **factors)
            quant_meta = {"bits": meta["bits"], "shape": [rows, cols], "group_size": meta["group_size"]}
            return cls(kind, (rows, cols), quant=QuantizedMatrix.from_tensors("Q", segments, quant_meta), **factors)
        if kind == "sparse":
            sparse = SparseDelta.from_tensors("", {f".{k}": v for k, v in segments.items()}, _without(meta, "kind"))
            return cls(kind, sparse.shape, sparse=sparse)
        shape = tuple(meta["shape"])
        return cls(kind, shape, dense=stored_tensor(segments, "delta", shape, torch.float16))

    def relative_error(self, delta: torch.Tensor) -> float:
        """``||delta - self.delta()||_F / ||delta||_F`` (0.0 when both are zero)."""
        reference = delta.detach().float()
        error = float(torch.linalg.vector_norm(reference - self.delta()))
        norm = float(torch.linalg.vector_norm(reference))
        return error / norm if norm else (0.0 if error == 0 else math.inf)


def compress_delta(
    delta: torch.Tensor, spec: Mapping[str, Any], *, method: Literal["randomized", "full"] = "randomized"
) -> CompressedDelta:
    """Compress ``delta`` as ``spec`` says (see :func:`normalize_spec`); ``method`` is the SVD's."""
    if not (isinstance(delta, torch.Tensor) and delta.is_floating_point()):
        raise HfGraftError("compress_delta needs a floating-point tensor.")
    spec = normalize_spec(spec, delta.shape)
    shape = tuple(delta.shape)
    if spec["kind"] == "sparse":
        return CompressedDelta("sparse", shape, sparse=prune(delta, spec["keep_fraction"]))
    if spec["kind"] == "dense_fp16":
        dense = delta.detach().half()
        if not torch.isfinite(dense).all():
            raise HfGraftError("compress_delta: the delta holds NaN, infinite or beyond-fp16 values.")
        return CompressedDelta("dense_fp16", shape, dense=dense)
    if spec["kind"] == "quant":
        quant = quantize(delta.detach().float(), spec["bits"], spec["group_size"], clip=True)
        if "rank" not in spec:
            return CompressedDelta("quant", shape, quant=quant)
        residual = _lowrank_parts(delta.detach().float() - quant.dequantize(), spec["rank"], spec["scheme"],
                                  spec["residual_group_size"], method)
        return CompressedDelta("quant", shape, quant=quant, **residual)
    return CompressedDelta("lowrank", shape, **_lowrank_parts(delta, spec["rank"], spec["scheme"], spec["group_size"], method))


def _lowrank_parts(delta: torch.Tensor, rank: int, scheme, group_size: int, method: str) -> dict[str, MixedPrecisionFactor]:
    """The quantized factors ``{"a", "b"}`` of ``delta``'s rank-``rank`` SVD."""
    factors = lowrank_factors(delta, energy=1.0, min_rank=rank, max_rank=rank, method=method)
    scheme = [tuple(block) for block in scheme]
    return {"a": quantize_factor(factors.a.T, scheme, group_size), "b": quantize_factor(factors.b, scheme, group_size)}


def _without(mapping: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if key not in keys}


def _factor_layout(factor: str, rows: int, scheme, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    layout = {}
    groups = -(-rows // group_size)
    for index, (bits, columns) in enumerate(scheme):
        name = f"{factor}.{index}"
        layout[f"{name}.packed"] = ((packed_size(rows * columns, bits),), torch.uint8)
        layout[f"{name}.scales"] = ((groups, columns), torch.float16)
        layout[f"{name}.zeros"] = ((groups, columns), torch.float16)
    return layout


def segment_layout(meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Segment name -> ``(shape, dtype)`` of every typed tensor a delta of ``meta`` is made of, in storage order.

    Lets a loader check a delta's payload before decoding any of it. ``meta`` is checked first
    (:func:`check_meta`).
    """
    meta = check_meta(meta, "")
    kind, shape = meta["kind"], tuple(meta["shape"])
    if kind == "dense_fp16":
        return {"delta": (shape, torch.float16)}
    if kind == "sparse":
        count = int(meta["count"])
        index = (
            {"indices": ((count,), torch.int32)}
            if meta["format"] == "indices"
            else {"bitmap": ((packed_size(math.prod(shape), 1),), torch.uint8)}
        )
        return {"values": ((count,), torch.float16), **index}
    layout = {}
    if kind == "quant":
        rows, cols = shape
        groups = -(-rows // meta["group_size"])
        layout["Q.packed"] = ((packed_size(rows * cols, meta["bits"]),), torch.uint8)
        layout["Q.scales"] = ((groups, cols), torch.float16)
        layout["Q.zeros"] = ((groups, cols), torch.float16)
        if "rank" not in meta:
            return layout
    group_size = meta["group_size"] if kind == "lowrank" else meta["residual_group_size"]
    layout.update(_factor_layout("A", shape[1], meta["scheme"], group_size))
    layout.update(_factor_layout("B", shape[0], meta["scheme"], group_size))
    return layout


def payload_size(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of the payload holding every segment of ``layout``."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def to_payload(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """The raw bytes of ``segments`` end to end, as one 1-D uint8 tensor (little-endian, as safetensors)."""
    parts = [segment.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for segment in segments]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def from_payload(
    payload: torch.Tensor, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    """Cut a payload back into the typed segments of ``layout`` (copies: the payload is left as it is)."""
    segments, offset = {}, 0
    flat = payload.reshape(-1).cpu()
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        segments[name] = flat[offset : offset + size].clone().view(dtype).reshape(shape)
        offset += size
    return segments


def stored_layout(prefix: str, meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> ``(shape, dtype)`` of the tensor :meth:`CompressedDelta.to_tensors` stores for ``meta``:
    one 1-D uint8 payload named ``prefix``. ``meta`` is checked first (:func:`check_meta`)."""
    return {prefix: ((payload_size(segment_layout(meta)),), torch.uint8)}


def check_meta(meta: Any, what: str) -> Mapping[str, Any]:
    """``meta`` (a :attr:`CompressedDelta.meta` read from a file), checked to be complete and consistent.

    Raises :class:`~hf_graft.errors.HfGraftError` naming the first bad or missing entry.
    """
    kind = meta.get("kind") if isinstance(meta, Mapping) else None
    what = f"compressed delta {what}"
    if kind == "dense_fp16":
        meta_keys(meta, ("kind", "shape"), what)
        meta_shape(meta, "shape", what)
    elif kind == "sparse":
        meta_keys(meta, ("kind", "shape", "format", "count"), what)
        meta_int(meta, "count", what, 0, math.prod(meta_shape(meta, "shape", what)))
        if meta["format"] not in ("indices", "bitmap"):
            raise HfGraftError(f"Metadata 'format' of {what} must be 'indices' or 'bitmap', got {meta['format']!r}.")
    elif kind == "lowrank":
        meta_keys(meta, ("kind", "shape", "rank", "scheme", "group_size"), what)
        rank = meta_int(meta, "rank", what, 1, min(meta_shape(meta, "shape", what, ndim=2)))
        meta_int(meta, "group_size", what, 1)
        _check_scheme(meta, rank, what)
    elif kind == "quant":
        residual = ("rank", "scheme", "residual_group_size")
        keys = ("kind", "shape", "bits", "group_size") + (residual if isinstance(meta, Mapping) and "rank" in meta else ())
        meta_keys(meta, keys, what)
        shape = meta_shape(meta, "shape", what, ndim=2)
        meta_int(meta, "bits", what, 1, 8)
        meta_int(meta, "group_size", what, 1)
        if "rank" in meta:
            rank = meta_int(meta, "rank", what, 1, min(shape))
            meta_int(meta, "residual_group_size", what, 1)
            _check_scheme(meta, rank, what)
    else:
        raise HfGraftError(f"Metadata 'kind' of {what} must be one of {sorted(_SPEC_KEYS)}, got {meta!r}.")
    return meta


def _check_scheme(meta: Mapping[str, Any], rank: int, what: str) -> None:
    scheme = meta["scheme"]
    if not (isinstance(scheme, list) and scheme) or resolve_scheme(scheme, rank) != tuple(map(tuple, scheme)):
        raise HfGraftError(
            f"Metadata 'scheme' of {what} must list [bits, columns] blocks covering exactly {rank} columns, "
            f"got {scheme!r}."
        )
