"""Compression of one module's weight delta into a SkillPack entry, and the byte allocator across modules.

A *spec* is a JSON-able dict naming how one delta is stored:

- ``{"kind": "lowrank", "rank": r, "scheme": [[bits, columns], ...], "group_size": g}``: truncated
  SVD (:mod:`.lowrank`) with mixed-precision factors (:mod:`.quantize`); ``scheme`` defaults to the
  Delta-CoMe-style 8/4/2 mix and ``group_size`` to 128. For attention and MLP deltas.
- ``{"kind": "sparse", "keep_fraction": f}``: magnitude pruning (:mod:`.prune`). For embedding and
  ``lm_head`` deltas.
- ``{"kind": "dense_fp16"}``: the delta in fp16. For norms, biases and other small tensors.

:func:`allocate` chooses a spec per module so that the whole SkillPack fits a byte budget with the
least total squared error, measured on the actual quantized candidates (GraftLLM, arXiv
2505.18502, sets these by hand per module type and names automating it as open work).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import HfGraftError
from .bitpack import check_fraction, check_int, meta_int, meta_keys, meta_shape, packed_size, stored_tensor
from .lowrank import lowrank_factors, rank_for_energy
from .prune import SparseDelta, kept_count, prune, sparse_nbytes
from .quantize import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_SCHEME,
    MixedPrecisionFactor,
    QuantizedMatrix,
    Scheme,
    quantize,
    quantize_factor,
    quantized_nbytes,
    resolve_scheme,
)

__all__ = [
    "Candidate",
    "CandidateLadder",
    "CompressedDelta",
    "allocate",
    "check_meta",
    "compress_delta",
    "measure_candidates",
    "normalize_spec",
    "select",
    "stored_layout",
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


@dataclass(frozen=True)
class CandidateLadder:
    """The specs :func:`allocate` measures for each module.

    Low-rank candidates are every rank in which the delta's singular values reach one of
    ``energies``, crossed with every scheme of ``schemes`` (all-8, 8/4, Delta-CoMe's 8/4/2 and 8/2
    by default); sparse candidates are ``keep_fractions``. All low-rank ranks come from one SVD,
    computed with ``method`` up to the largest energy.
    """

    energies: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    schemes: tuple[Scheme, ...] = (((8, None),), ((8, 2), (4, None)), DEFAULT_SCHEME, ((8, 2), (2, None)))
    keep_fractions: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
    group_size: int = DEFAULT_GROUP_SIZE
    method: Literal["randomized", "full"] = "randomized"

    def __post_init__(self) -> None:
        if not (self.energies and self.schemes and self.keep_fractions):
            raise HfGraftError("A CandidateLadder needs at least one energy, one scheme and one keep fraction.")
        for energy in self.energies:
            check_fraction(energy, "CandidateLadder energy")
        for fraction in self.keep_fractions:
            check_fraction(fraction, "CandidateLadder keep_fraction")
        for scheme in self.schemes:
            resolve_scheme(scheme, 1)
        check_int(self.group_size, "CandidateLadder group_size", 1)
        if self.method not in ("randomized", "full"):
            raise HfGraftError(f"CandidateLadder method must be 'randomized' or 'full', got {self.method!r}.")


@dataclass(frozen=True, order=True)
class Candidate:
    """A spec with the exact bytes it stores and the squared Frobenius error it leaves."""

    nbytes: int
    squared_error: float
    spec: dict[str, Any] = field(compare=False)


def measure_candidates(
    delta: torch.Tensor, *, sparse: bool = False, candidates: CandidateLadder = CandidateLadder()
) -> list[Candidate]:
    """Every candidate spec for ``delta``, each with its exact bytes and measured squared error.

    A delta that is not 2-D has the single candidate ``dense_fp16``; ``sparse`` selects the
    pruning ladder; otherwise the low-rank ladder.
    """
    if not (isinstance(delta, torch.Tensor) and delta.is_floating_point()):
        raise HfGraftError("measure_candidates needs a floating-point tensor.")
    matrix = delta.detach().float()
    if matrix.dim() != 2:
        error = float(torch.sum((matrix - matrix.half().float()).double().square()))
        return [Candidate(2 * matrix.numel(), error, {"kind": "dense_fp16"})]
    if sparse:
        return _sparse_candidates(matrix, candidates.keep_fractions)
    return _lowrank_candidates(matrix, candidates)


def _sparse_candidates(matrix: torch.Tensor, keep_fractions: Sequence[float]) -> list[Candidate]:
    """Pruning errors for every keep fraction from one ``topk``.

    The error of keeping ``k`` entries is the energy of the dropped ones plus the fp16 rounding of
    the kept ones.
    """
    flat = matrix.reshape(-1)
    counts = {kept_count(flat.numel(), fraction): fraction for fraction in sorted(keep_fractions)}
    top = flat[torch.topk(flat.abs(), max(counts), sorted=True).indices].double()
    zero = top.new_zeros(1)
    kept = torch.cat([zero, torch.cumsum(top.square(), 0)])
    rounding = torch.cat([zero, torch.cumsum((top - top.half().double()).square(), 0)])
    total = float(flat.double().square().sum())
    return [
        Candidate(
            sparse_nbytes(flat.numel(), count),
            max(0.0, total - float(kept[count]) + float(rounding[count])),
            {"kind": "sparse", "keep_fraction": fraction},
        )
        for count, fraction in counts.items()
    ]


def _lowrank_candidates(matrix: torch.Tensor, ladder: CandidateLadder) -> list[Candidate]:
    """Errors of every (rank, scheme) candidate from one SVD, without forming any ``B @ A``.

    Quantization is per column, so column ``j`` quantized at ``bits`` is the same in every
    candidate; each width quantizes the factors once. With ``b_j``, ``a_j`` the quantized
    columns of a candidate, ``||dW - sum_j b_j a_j^T||^2 = ||dW||^2 - 2 sum_j b_j^T dW a_j
    + sum_ij (b_i . b_j)(a_i . a_j)``, and the sums over the first ``r`` columns of every rank
    come from prefix sums.
    """
    out_features, in_features = matrix.shape
    factors = lowrank_factors(matrix, energy=max(ladder.energies), method=ladder.method)
    s, total = factors.singular_values, factors.total_energy
    ranks = sorted({min(max(rank_for_energy(s, total, e), 1), factors.rank) for e in ladder.energies})
    full = [resolve_scheme(scheme, factors.rank) for scheme in ladder.schemes]
    widths = {bits for blocks in full for bits, _ in blocks}
    b_at, a_at, cross_at = {}, {}, {}
    for bits in widths:
        b_at[bits] = quantize(factors.b, bits, ladder.group_size).dequantize()
        a_at[bits] = quantize(factors.a.T, bits, ladder.group_size).dequantize().T
        cross_at[bits] = ((b_at[bits].T @ matrix) * a_at[bits]).sum(dim=1).double()
    results: dict[str, Candidate] = {}
    for blocks in full:
        column_bits = torch.tensor([bits for bits, columns in blocks for _ in range(columns)])
        column_bits = column_bits.to(matrix.device)
        b = torch.empty_like(factors.b)
        a = torch.empty_like(factors.a)
        cross = torch.empty(factors.rank, dtype=torch.float64, device=matrix.device)
        for bits in widths:
            mask = column_bits == bits
            b[:, mask], a[mask], cross[mask] = b_at[bits][:, mask], a_at[bits][mask], cross_at[bits][mask]
        b64, a64 = b.double(), a.double()
        gram = ((b64.T @ b64) * (a64 @ a64.T)).cumsum(0).cumsum(1)
        cross = cross.cumsum(0)
        for rank in ranks:
            spec = {"kind": "lowrank", "rank": rank, "scheme": blocks, "group_size": ladder.group_size}
            spec = normalize_spec(spec, matrix.shape)
            nbytes = sum(
                quantized_nbytes(out_features, columns, bits, ladder.group_size)
                + quantized_nbytes(in_features, columns, bits, ladder.group_size)
                for bits, columns in spec["scheme"]
            )
            error = max(0.0, total - 2 * float(cross[rank - 1]) + float(gram[rank - 1, rank - 1]))
            results.setdefault(json.dumps(spec), Candidate(nbytes, error, spec))
    return list(results.values())


def select(
    candidates: Mapping[str, Sequence[Candidate]], byte_budget: int, *, resolution: int = 20_000
) -> dict[str, Candidate]:
    """Pick one candidate per module: the least total squared error with total bytes <= ``byte_budget``.

    A multiple-choice knapsack, solved exactly by dynamic programming over bytes counted in whole
    units of ``1 / resolution`` of the largest SkillPack the candidates can make, each candidate's
    size rounded up. So the result never exceeds the budget; its error is at most that of the exact
    optimum for a budget smaller by one unit per module; and the total error never rises when the
    budget grows, since the unit does not depend on the budget and a larger one only adds choices.
    (A greedy walk along each module's convex hull of (bytes, error) is cheaper, but strands bytes
    whenever a module's next hull step is larger than what is left.)
    """
    names = list(candidates)
    if not names or any(not candidates[name] for name in names):
        raise HfGraftError("select needs at least one candidate for every module.")
    check_int(byte_budget, "byte_budget", 0)
    check_int(resolution, "resolution", 1)
    options = [_frontier(candidates[name]) for name in names]
    unit = max(1, -(-sum(frontier[-1].nbytes for frontier in options) // resolution))
    capacity = min(byte_budget // unit, sum(-(-frontier[-1].nbytes // unit) for frontier in options))
    # best[u]: least error of the modules so far within u units; picks[m, u]: module m's choice there.
    best = np.zeros(capacity + 1)
    picks = np.full((len(names), capacity + 1), -1, dtype=np.int32)
    for module, frontier in enumerate(options):
        reached = np.full(capacity + 1, np.inf)
        for index, candidate in enumerate(frontier):
            units = -(-candidate.nbytes // unit)
            if units > capacity:
                break
            total = best[: capacity + 1 - units] + candidate.squared_error
            better = total < reached[units:]
            reached[units:][better] = total[better]
            picks[module, units:][better] = index
        best = reached
    if not np.isfinite(best[capacity]):
        cheapest = sum(frontier[0].nbytes for frontier in options)
        raise HfGraftError(
            f"A budget of {byte_budget} bytes is below the {cheapest} bytes of the cheapest candidates; "
            "allow more bytes (a lower target_ratio) or add cheaper candidates (lower energies, fewer bits)."
        )
    chosen: dict[str, Candidate] = {}
    units_left = capacity
    for module in reversed(range(len(names))):
        candidate = options[module][picks[module, units_left]]
        chosen[names[module]] = candidate
        units_left -= -(-candidate.nbytes // unit)
    return {name: chosen[name] for name in names}


def _frontier(options: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both counts, by increasing bytes (and decreasing error)."""
    frontier: list[Candidate] = []
    for candidate in sorted(options):
        if not frontier or candidate.squared_error < frontier[-1].squared_error:
            frontier.append(candidate)
    return frontier


def allocate(
    deltas: Mapping[str, torch.Tensor],
    target_ratio: float | None = None,
    byte_budget: int | None = None,
    *,
    sparse: Collection[str] = (),
    candidates: CandidateLadder = CandidateLadder(),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Choose a spec per delta so the SkillPack fits the budget with the least total squared error.

    The budget is ``byte_budget`` bytes of stored tensors, or the bf16 size of all ``deltas``
    divided by ``target_ratio`` (give exactly one). Deltas named in ``sparse`` (embeddings,
    ``lm_head``) get pruning candidates, other 2-D deltas low-rank ones, and the rest are stored
    ``dense_fp16`` and count against the budget. Each module's candidates are measured by
    :func:`measure_candidates` and one is picked per module by :func:`select`.
    """
    if (target_ratio is None) == (byte_budget is None):
        raise HfGraftError("allocate needs exactly one of target_ratio and byte_budget.")
    unknown = sorted(set(sparse) - set(deltas))
    if unknown:
        raise HfGraftError(f"sparse names {unknown[:5]} are not among the deltas; pass names of the deltas.")
    if target_ratio is not None:
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not target_ratio > 0:
            raise HfGraftError(f"target_ratio must be a positive number, got {target_ratio!r}.")
        byte_budget = math.floor(sum(2 * delta.numel() for delta in deltas.values()) / target_ratio)
    check_int(byte_budget, "byte_budget", 0)
    measured = {
        name: measure_candidates(deltas[name], sparse=name in sparse, candidates=candidates)
        for name in tqdm(deltas, desc="Measuring SkillPack candidates", disable=not progress)
    }
    return {name: choice.spec for name, choice in select(measured, byte_budget).items()}


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
