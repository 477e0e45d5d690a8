"""The published delta-compression anchors SkillPacks are compared with, as real files at a byte budget.

Each anchor turns ``{parameter name: delta}`` into what it stores and the dense deltas those
bytes decode to. Every anchor's file is written like a SkillPack's: one uint8 payload per
parameter (its segments end to end) in a safetensors file with the layout as JSON metadata, so
header bytes weigh the same for every method and ``file_bytes`` is the size on disk.

- Delta-CoMe (Ping et al., 2024): truncated SVD, singular vectors at 8/3/2 bits by singular value
  (2 at 8, 32 at 3, the rest at 2), GPTQ on ``V`` then ``U`` with calibration Hessians, group
  128; one common rank fraction across matrices, the largest that fits.
- BitDelta (Liu et al., 2024): the sign of every entry and one scale per matrix, the scales then
  distilled (AdamW, lr 1e-4, logit MSE against the tuned model on the calibration batches). Below
  its own size it adds residual sign masks, each with its own scale, as its paper describes.
- SVD-only bf16 (mergekit's LoRA extraction), magnitude pruning, DARE (random drop, rescale).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from hf_graft.safetensors_io import save_tensors
from hf_graft.skillpack.compression.bitpack import pack_bits
from hf_graft.skillpack.compression.calibrate import compress_delta_calibrated
from hf_graft.skillpack.compression.formats import compress_delta, payload_size, segment_layout, to_payload
from hf_graft.skillpack.compression.prune import prune, sparse_nbytes

DELTA_COME_SCHEME = [[8, 2], [3, 32], [2, None]]


@dataclass
class Encoded:
    """What an anchor stores (segments per parameter) and the dense deltas they decode to."""

    segments: dict
    deltas: dict
    note: str = ""

    def save(self, path: str) -> int:
        """Write the file; returns its size in bytes."""
        tensors = {name: to_payload(parts) for name, parts in self.segments.items()}
        layout = {name: [[list(t.shape), str(t.dtype)] for t in parts] for name, parts in self.segments.items()}
        save_tensors(tensors, path, metadata={"layout": json.dumps(layout, separators=(",", ":"))})
        return os.path.getsize(path)


def _vectors(deltas: dict) -> tuple[dict, dict]:
    """1-D deltas (norms, biases) in fp16, as every method stores them."""
    vectors = {name: d for name, d in deltas.items() if d.dim() != 2}
    return {name: [d.half()] for name, d in vectors.items()}, {name: d.half().float() for name, d in vectors.items()}


def _overhead(name: str) -> int:
    """Header bytes of one payload entry (an upper bound)."""
    return len(json.dumps({name: {"dtype": "U8", "shape": [10**9], "data_offsets": [10**9, 10**9]}})) + 40


def _largest_fraction(cost, budget: int) -> float:
    """The largest rank fraction in [0, 1] whose ``cost(fraction)`` fits ``budget`` (bisection)."""
    low, high = 0.0, 1.0
    if cost(high) <= budget:
        return high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) <= budget else (low, middle)
    return low


def delta_come(deltas: dict, budget: int, hessians: dict, transposed: frozenset = frozenset()) -> Encoded:
    """Delta-CoMe at ``budget`` bytes; ``hessians`` maps parameter names to input second moments (or is
    empty); the deltas named in ``transposed`` are stored ``[in, out]`` (GPT-2's ``Conv1D``)."""
    segments, dense = _vectors(deltas)
    matrices = {name: d for name, d in deltas.items() if d.dim() == 2}
    fixed = sum(2 * d.numel() + _overhead(n) for n, d in deltas.items() if d.dim() != 2)

    def ranks(fraction: float) -> dict:
        return {name: max(1, math.floor(fraction * min(d.shape))) for name, d in matrices.items()}

    def cost(fraction: float) -> int:
        return fixed + sum(
            payload_size(segment_layout({"kind": "lowrank", "shape": list(matrices[n].shape), "rank": r, "group_size": 128,
                                         "scheme": _resolved(DELTA_COME_SCHEME, r)})) + _overhead(n)
            for n, r in ranks(fraction).items()
        )

    chosen = ranks(_largest_fraction(cost, budget))
    for name, delta in matrices.items():
        spec = {"kind": "lowrank", "rank": chosen[name], "scheme": DELTA_COME_SCHEME, "group_size": 128}
        hessian, flip = hessians.get(name), name in transposed
        oriented = delta.T if flip else delta
        packed = compress_delta_calibrated(oriented, spec, hessian) if hessian is not None else compress_delta(oriented, spec)
        segments[name] = list(packed.segments().values())
        dense[name] = packed.delta().T if flip else packed.delta()
    note = "" if cost(_largest_fraction(cost, budget)) <= budget else "smallest rank exceeds the budget"
    return Encoded(segments, dense, note)


def _resolved(scheme, rank: int) -> list:
    from hf_graft.skillpack.compression.quantize import resolve_scheme

    return [list(block) for block in resolve_scheme(scheme, rank)]


def bitdelta(deltas: dict, budget: int, distill) -> Encoded:
    """BitDelta with as many sign masks as the budget holds (at least one), scales distilled by ``distill``.

    ``distill(signs, scales) -> scales`` trains the per-matrix scales (one per mask) on logit MSE.
    """
    segments, dense = _vectors(deltas)
    matrices = {name: d for name, d in deltas.items() if d.dim() == 2}
    one_mask = sum(math.ceil(d.numel() / 8) + 2 for d in matrices.values())
    fixed = sum(2 * d.numel() for n, d in deltas.items() if d.dim() != 2) + sum(map(_overhead, deltas))
    masks = max(1, min(3, (budget - fixed) // one_mask))
    signs, scales = {}, {}
    for name, delta in matrices.items():
        residual = delta.float()
        signs[name], scales[name] = [], []
        for _ in range(masks):
            sign = torch.where(residual >= 0, 1.0, -1.0)
            scale = residual.abs().mean()
            signs[name].append(sign)
            scales[name].append(scale)
            residual = residual - scale * sign
    scales = distill(signs, scales)
    for name in matrices:
        segments[name] = [pack_bits((s > 0).to(torch.uint8), 1) for s in signs[name]] + [
            torch.stack([c.detach() for c in scales[name]]).half()
        ]
        dense[name] = sum(c.detach().half().float() * s for c, s in zip(scales[name], signs[name]))
    note = f"{masks} sign mask{'s' if masks > 1 else ''}" + (" (own size, above the budget)" if fixed + masks * one_mask > budget else "")
    return Encoded(segments, dense, note)


def svd_bf16(deltas: dict, budget: int) -> Encoded:
    """Per-matrix truncated SVD with bf16 factors, one common rank fraction, the largest that fits."""
    segments, dense = _vectors(deltas)
    matrices = {name: d for name, d in deltas.items() if d.dim() == 2}
    fixed = sum(2 * d.numel() + _overhead(n) for n, d in deltas.items() if d.dim() != 2)
    factors = {name: torch.linalg.svd(d.float(), full_matrices=False) for name, d in matrices.items()}

    def ranks(fraction: float) -> dict:
        return {name: math.floor(fraction * min(d.shape)) for name, d in matrices.items()}

    def cost(fraction: float) -> int:
        return fixed + sum(2 * r * sum(matrices[n].shape) + _overhead(n) for n, r in ranks(fraction).items())

    for name, rank in ranks(_largest_fraction(cost, budget)).items():
        u, s, vh = factors[name]
        root = s[:rank].sqrt()
        b, a = (u[:, :rank] * root).bfloat16(), (root[:, None] * vh[:rank]).bfloat16()
        segments[name] = [b, a]
        dense[name] = b.float() @ a.float()
    return Encoded(segments, dense)


def magnitude(deltas: dict, budget: int) -> Encoded:
    """The largest entries over all matrices together, as many as fit (fp16 values, indices or bitmap)."""
    return _sparse(deltas, budget, lambda d, count: prune(d, count / d.numel()))


def dare(deltas: dict, budget: int, seed: int = 0) -> Encoded:
    """DARE: each matrix keeps a random share of its entries, rescaled by its inverse; the same share
    everywhere, the largest that fits."""
    generator = torch.Generator().manual_seed(seed)

    def keep(delta: torch.Tensor, count: int):
        scores = torch.rand(delta.shape, generator=generator)
        sparse = prune(delta * (delta.numel() / max(count, 1)), count / delta.numel(), scores=scores)
        return sparse

    return _sparse(deltas, budget, keep, uniform=True)


def _sparse(deltas: dict, budget: int, keep, uniform: bool = False) -> Encoded:
    segments, dense = _vectors(deltas)
    matrices = {name: d for name, d in deltas.items() if d.dim() == 2}
    fixed = sum(2 * d.numel() + _overhead(n) for n, d in deltas.items() if d.dim() != 2)
    if uniform:
        def counts(fraction):
            return {n: math.floor(fraction * d.numel()) for n, d in matrices.items()}
    else:
        magnitudes = torch.cat([d.abs().reshape(-1) for d in matrices.values()])
        names = list(matrices)

        def counts(fraction):
            kept = math.floor(fraction * magnitudes.numel())
            if kept == 0:
                return dict.fromkeys(names, 0)
            threshold = torch.topk(magnitudes, kept).values[-1]
            return {n: int((matrices[n].abs() >= threshold).sum()) for n in names}

    def cost(fraction):
        return fixed + sum(sparse_nbytes(matrices[n].numel(), c) + _overhead(n) for n, c in counts(fraction).items())

    for name, count in counts(_largest_fraction(cost, budget)).items():
        delta = matrices[name]
        if count == 0:
            dense[name] = torch.zeros_like(delta)
            continue
        sparse = keep(delta, count)
        segments[name] = [t for t in sparse.to_tensors("").values()]
        dense[name] = sparse.to_dense()
    return Encoded(segments, dense)
