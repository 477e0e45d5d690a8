"""Which format, and how large, each module's delta gets: measured candidates and one byte budget.

Every module is offered a ladder of formats (:class:`CandidateLadder`), each actually compressed
and measured by what its error costs the model (:mod:`.objective`):

- ``quant`` at 1-4 bits: the delta itself, GPTQ-quantized in groups (no SVD). Full fine-tunes are
  far from low rank, and factors of rank ``r`` are larger than the matrix once
  ``r > mn / (m + n)``; at 1 bit with one grid per column this is BitDelta's sign and scale.
- ``quant`` at 1 bit plus a low-rank correction of what the signs missed (D-QReLO's shape).
- ``lowrank``: truncated activation-aware SVD with mixed-precision factors, from all-4-bit to
  2- and 3-bit-heavy splits and Delta-CoMe's 8/3/2 recipe, at ranks chosen by kept energy.
- ``sparse`` (embeddings and heads): the entries whose loss costs most, at several kept fractions.
- leaving the module's delta out altogether (no bytes, the whole delta as error).

:func:`select` then picks one candidate per module under the budget with the least total cost.
A candidate's bytes are what it adds to the saved files: its payload and its share of the
pack's layout (:data:`ENTRY_BYTES`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import HfGraftError
from ...validation import check_fraction, check_int
from .calibrate import DEFAULT_DAMPING, compress_with_statistics, damped_cholesky, gptq_weights, quantize_calibrated
from .estimate import column_errors, energy_after, grid_costs, lowrank_cost, sparse_costs
from .formats import CompressedDelta, compress_delta, normalize_spec, payload_size, segment_layout
from .lowrank import balanced_top, gram_eigen, lowrank_factors, rank_for_energy
from .objective import ModuleStatistics, squared_norm
from .prune import kept_count, sparse_format
from .quantize import DEFAULT_GROUP_SIZE, Scheme, quantize, resolve_scheme

__all__ = [
    "OMIT",
    "Candidate",
    "CandidateLadder",
    "allocate",
    "ENTRY_BYTES",
    "measure_candidates",
    "predicted_quant_costs",
    "select",
]

#: The spec of a module whose delta is left out of the pack.
OMIT: dict[str, Any] = {"kind": "omit"}

#: float32 bytes of the error rows a low-rank candidate's cost is made from at a time.
FACTOR_CHUNK_BYTES = 16 << 20

DELTA_COME_SCHEME: tuple = ((8, 2), (3, 32), (2, None))
"""Delta-CoMe's mix at 4096 wide (2 singular vectors at 8 bits, 32 at 3, the rest at 2)."""


@dataclass(frozen=True)
class CandidateLadder:
    """The formats :func:`measure_candidates` tries on each module.

    ``quant_bits`` x ``quant_group_sizes`` (``None``: one grid per column of the weight) for
    direct quantization; ``residual_ranks`` (fractions of the smaller side) for 1-bit deltas with a
    low-rank correction; ``energies`` x ``schemes`` for low rank; ``keep_fractions`` for sparse
    deltas of embeddings and heads; ``allow_omit`` lets a module's delta be left out.
    """

    quant_bits: tuple[int, ...] = (1, 2, 3, 4)
    quant_group_sizes: tuple[int | None, ...] = (DEFAULT_GROUP_SIZE, None)
    residual_ranks: tuple[float, ...] = (0.02, 0.06)
    residual_scheme: Scheme = ((8, 2), (4, None))
    energies: tuple[float, ...] = (0.1, 0.25, 0.5, 0.7, 0.85, 0.95)
    schemes: tuple[Scheme, ...] = (
        DELTA_COME_SCHEME, ((8, 1), (3, 4), (2, None)), ((8, 2), (3, None)), ((8, 2), (4, None)), ((8, None),)
    )
    keep_fractions: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    group_size: int = DEFAULT_GROUP_SIZE
    allow_omit: bool = True
    #: ``"predicted"``: candidate costs from one factorization and closed forms (:mod:`.estimate`);
    #: ``"exhaustive"``: every candidate compressed and decoded (the reference the predictions are checked by).
    search: str = "predicted"

    def __post_init__(self) -> None:
        if self.search not in ("predicted", "exhaustive"):
            raise HfGraftError(f"CandidateLadder search must be 'predicted' or 'exhaustive', got {self.search!r}.")
        for bits in self.quant_bits:
            check_int(bits, "CandidateLadder quant_bits", 1, 8)
        for size in self.quant_group_sizes:
            if size is not None:
                check_int(size, "CandidateLadder quant_group_sizes", 1)
        for fraction in (*self.residual_ranks, *self.energies, *self.keep_fractions):
            check_fraction(fraction, "CandidateLadder fraction")
        for scheme in (*self.schemes, self.residual_scheme):
            resolve_scheme(scheme, 1)
        check_int(self.group_size, "CandidateLadder group_size", 1)
        if not (self.quant_bits or self.energies):
            raise HfGraftError("A CandidateLadder needs quantization widths or low-rank energies.")


@dataclass(frozen=True, order=True)
class Candidate:
    """A spec with the bytes it adds to the saved pack and the cost of its error (:mod:`.objective`)."""

    nbytes: int
    cost: float
    spec: dict[str, Any] = field(compare=False)


#: Bytes one stored delta is reckoned to add besides its payload while formats are chosen: its
#: share of the pack's deflated layout (a few bytes a module, :func:`~..config.encode_layout`). The
#: pack's total is then sized exactly (:func:`~..extraction.packing.choose`).
ENTRY_BYTES = 16


def measure_candidates(
    name: str,
    delta: torch.Tensor,
    statistics: ModuleStatistics | None,
    *,
    sparse: bool = False,
    ladder: CandidateLadder = CandidateLadder(),
    keep_basis: Callable[[torch.Tensor], None] | None = None,
) -> list[Candidate]:
    """Every candidate of ``ladder`` for the delta ``name`` (``module.part``), with its bytes and cost.

    A delta that is not 2-D has the single candidate ``dense_fp16``; ``sparse`` adds the pruning
    ladder (embeddings, heads). ``statistics`` ``None`` measures the Frobenius error (data-free).
    With ``ladder.search == "predicted"`` the costs come from one factorization of the delta and
    closed forms (:mod:`.estimate`), GPTQ's as its own error accounting predicts it; a weight used
    twice (tied embedding and head) adds the second use's cost, through its Hessian's diagonal
    (low-rank costs in proportion to the delta's own). Under the identity
    objective ``keep_basis`` receives ``A^T`` (``[in, r]``) of the factors the low-rank candidates were
    made of, so the chosen one is compressed without factoring the delta again (``basis=`` of
    :func:`~.calibrate.compress_with_statistics`).
    """
    matrix = delta.detach().float()
    if matrix.dim() != 2:
        packed = compress_delta(matrix, {"kind": "dense_fp16"})
        return [_measured(name, matrix, packed, {"kind": "dense_fp16"}, None)]
    statistics = statistics or ModuleStatistics.identity(matrix.shape, device=matrix.device)
    total = statistics.cost(matrix)
    # Left out, a delta costs only its name in the config's list of omitted modules.
    candidates = [Candidate(0, total, dict(OMIT))] if ladder.allow_omit else []
    if ladder.search == "exhaustive" or (statistics.also and statistics.transposed):
        candidates += _tried(name, matrix, statistics, _specs(matrix, sparse, ladder))
        if ladder.energies:
            candidates += _lowrank_candidates(name, matrix, statistics, ladder)
    else:
        candidates += _predicted(name, matrix, statistics, sparse, ladder, keep_basis)
    if not candidates:
        raise HfGraftError(f"No candidate format fits the delta of {name} (shape {tuple(matrix.shape)}).")
    return candidates


def _tried(name: str, matrix: torch.Tensor, statistics: ModuleStatistics, specs: Sequence[dict]) -> list[Candidate]:
    """Candidates of ``specs``, each compressed for real and its error decoded and measured."""
    candidates = []
    for spec in specs:
        try:
            packed = compress_with_statistics(matrix, spec, statistics)
        except HfGraftError:
            continue  # e.g. a grid beyond fp16: not a candidate for this delta
        candidates.append(_measured(name, matrix, packed, spec, statistics))
    return candidates


def _entry_weights(statistics: ModuleStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the delta's rows and columns (in its own layout) in a diagonal objective."""
    if statistics.transposed:
        return statistics.diagonal, statistics.row_weights
    return statistics.row_weights, statistics.diagonal


def _predicted(name: str, matrix: torch.Tensor, statistics: ModuleStatistics, sparse: bool, ladder: CandidateLadder,
               keep_basis: Callable[[torch.Tensor], None] | None = None) -> list[Candidate]:
    """The ladder's candidates with costs predicted (:mod:`.estimate`): GPTQ's included, as rounding errors
    weighted by what its compensation leaves of each input's second moment."""
    rows, cols = matrix.shape
    candidates: list[Candidate] = []
    own = dataclasses.replace(statistics, also=())
    # Further uses of a tied weight: errors spread over its inputs cost their second moments.
    others = [dataclasses.replace(other, hessian=other.diagonal, also=()) for other in statistics.also]
    alone = own.cost(matrix) if others else 0.0
    # Low-rank costs of a tied weight: its further uses' in proportion to the delta's own.
    share = 1.0 + sum(other.cost(matrix) for other in others) / alone if alone else 1.0

    def shared(found: list[Candidate]) -> list[Candidate]:
        return [dataclasses.replace(candidate, cost=candidate.cost * share) for candidate in found] if others else found

    quant = [(spec["group_size"], spec["bits"]) for spec in _specs(matrix, False, ladder) if "rank" not in spec]
    costs = predicted_quant_costs(matrix, quant, own)
    for other in others:
        extra = predicted_quant_costs(matrix, quant, other)
        costs = {key: cost + extra[key] for key, cost in costs.items() if key in extra}
    for (size, bits), cost in costs.items():
        candidates.append(_sized(name, {"kind": "quant", "bits": bits, "group_size": size}, matrix.shape, cost))
    if sparse:  # the dropped entries are spread over the inputs: each objective's diagonal weighs them
        candidates += _sparse_candidates(name, matrix, [dataclasses.replace(own, hessian=own.diagonal), *others], ladder)
    if ladder.energies:
        candidates += shared(_predicted_lowrank(name, matrix, own, ladder, keep_basis if not others else None))
    residual = [spec for spec in _specs(matrix, False, ladder) if "rank" in spec]
    one_bit = [c for c in candidates if c.spec.get("bits") == 1 and c.spec.get("group_size") == rows]
    if residual and one_bit and one_bit[0] in _frontier(candidates):
        # 1-bit signs with a low-rank correction refine the 1-bit delta, costed only where it competes: the
        # signs quantized once as compression quantizes them, their corrections as low rank of what is left.
        signs = quantize_calibrated(matrix, 1, rows, statistics)
        candidates += shared(_predicted_lowrank(name, matrix - signs.dequantize(), own, ladder, fixed=residual))
    return candidates


def predicted_quant_costs(
    matrix: torch.Tensor, formats: Sequence[tuple[int, int]], statistics: ModuleStatistics, *, upper: torch.Tensor | None = None
) -> dict[tuple[int, int], float]:
    """Predicted costs of quantizing ``matrix`` in each ``(group_size, bits)`` format: round to nearest on
    fitted grids where the inputs are uncorrelated, GPTQ (:func:`~.calibrate.gptq_weights`) where not.
    A format whose grids would leave the fp16 range is left out. ``upper``: GPTQ's factor
    (:func:`~.calibrate.gptq_upper`) when already known, e.g. for the row blocks of one matrix."""
    sizes = {size: [bits for s, bits in formats if s == size] for size, _ in formats}
    if statistics.is_diagonal:
        weights = _entry_weights(statistics)
        return {(size, bits): cost for size, widths in sizes.items() for bits, cost in _grid_costs(matrix, widths, size, *weights).items()}
    signal = squared_norm(matrix)
    shares = {(size, bits): cost / signal if signal else 0.0
              for size, widths in sizes.items() for bits, cost in _grid_costs(matrix, widths, size, None, None).items()}
    costs = {}
    for (size, bits), weights in gptq_weights(statistics.hessian, shares, upper=upper).items():
        effective = dataclasses.replace(statistics, hessian=weights)
        costs.update({(size, b): cost for b, cost in _grid_costs(matrix, [bits], size, *_entry_weights(effective)).items()})
    return costs


def _by_width(predict, widths) -> dict:
    """``predict(widths)``, or where a grid beyond fp16 refuses some width, the widths that fit, one by one."""
    try:
        return predict(widths)
    except HfGraftError:
        found = {}
        for bits in widths:
            try:
                found.update(predict([bits]))
            except HfGraftError:
                continue
        return found


def _grid_costs(matrix, widths, size, row_w, col_w) -> dict[int, float]:
    return _by_width(lambda chosen: grid_costs(matrix, chosen, size, row_w, col_w), widths)


def _column_errors(factor, widths, size, row_w) -> dict[int, torch.Tensor]:
    return _by_width(lambda chosen: column_errors(factor, chosen, size, row_w), widths)


def _sized(name: str, spec: dict, shape, cost: float, meta: dict | None = None) -> Candidate:
    """A candidate of ``spec`` with the bytes its stored form adds to the pack."""
    meta = meta or {**normalize_spec(spec, shape), "shape": list(shape)}
    return Candidate(payload_size(segment_layout(meta)) + ENTRY_BYTES, cost, dict(spec))


def _sparse_candidates(name: str, matrix: torch.Tensor, objectives: Sequence[ModuleStatistics], ladder: CandidateLadder) -> list[Candidate]:
    """Pruning candidates: the dropped entries' scores under the diagonal ``objectives`` (summed), the
    entries ranked by the first one's (as :func:`~.calibrate.compress_with_statistics` prunes), from one
    binned pass (:func:`.estimate.sparse_costs`)."""
    weights = [_entry_weights(objective) for objective in objectives]
    step = max(1, (1 << 20) // matrix.shape[1])

    def scores(start: int):
        squares = matrix[start:start + step].square()
        each = [squares * row_w[start:start + step, None] * col_w[None, :] for row_w, col_w in weights]
        return each[0] if len(each) == 1 else (each[0], sum(each))

    numel = matrix.numel()
    fractions = list(dict.fromkeys(ladder.keep_fractions))
    counts = [kept_count(numel, fraction) for fraction in fractions]
    costs = sparse_costs((scores(start) for start in range(0, len(matrix), step)), counts)
    candidates = []
    for fraction, count, cost in zip(fractions, counts, costs):
        meta = {"kind": "sparse", "shape": list(matrix.shape), "format": sparse_format(numel, count), "count": count}
        candidates.append(_sized(name, {"kind": "sparse", "keep_fraction": fraction}, matrix.shape, cost, meta))
    return candidates


def _predicted_lowrank(name: str, matrix: torch.Tensor, statistics: ModuleStatistics, ladder: CandidateLadder,
                       keep_basis: Callable[[torch.Tensor], None] | None = None, fixed: Sequence[dict] | None = None) -> list[Candidate]:
    """Low-rank candidates at every (rank, scheme) of the ladder, costed in closed form from one factorization.

    The factorization is of ``diag(sqrt(f)) dW L`` (``L L^T = H``; the delta itself for the
    identity), where the objective is the squared error; each factor column's quantization error
    at each width is predicted by :func:`.estimate.column_errors`, weighted as the objective
    weighs that factor's rows (the Hessian's diagonal for ``A``: GPTQ then only lowers it).
    ``fixed``: specs with their own ``rank`` and ``scheme`` to cost instead of the ladder's (the
    corrections of a 1-bit delta, ``matrix`` then being what its signs leave).
    """
    oriented = statistics.oriented(matrix)
    rows, cols = oriented.shape
    identity = statistics.is_diagonal and bool((statistics.diagonal == 1).all() and (statistics.row_weights == 1).all())
    if identity:
        weights = root = None
        scaled = oriented
    else:
        weights = statistics.row_weights.clamp_min(0)
        weights = (weights + 0.01 * float(weights.mean().clamp_min(1e-30))).sqrt()
        root = _root(statistics.compact_hessian)
        scaled = oriented * weights[:, None]
        scaled = scaled.mul_(root[None, :]) if statistics.is_diagonal else scaled @ root
    total = squared_norm(scaled)
    eigenvalues, eigenvectors = gram_eigen(scaled)
    singular = eigenvalues.sqrt()
    if fixed is not None:
        ranks = sorted({spec["rank"] for spec in fixed if spec["rank"] <= len(singular)})
    else:
        ranks = sorted({min(max(rank_for_energy(singular, total, e), 1), len(singular)) for e in ladder.energies})
        ranks = [rank for rank in ranks if rank * (rows + cols) < rows * cols]  # else the factors outweigh the matrix
    if not ranks:
        return []
    b, a, values = balanced_top(scaled, eigenvectors[:, : max(ranks)])  # b [out, r], a = A^T [in, r]
    del scaled, eigenvectors
    if identity and keep_basis is not None:
        keep_basis(a.clone())
    if not identity:
        b = b / weights[:, None]
        a = a / root[:, None] if statistics.is_diagonal else torch.linalg.solve_triangular(root.T, a, upper=True)
    schemes = {tuple(map(tuple, resolve_scheme(s, max(ranks)))) for s in ((ladder.residual_scheme,) if fixed is not None else ladder.schemes)}
    widths = sorted({bits for scheme in schemes for bits, _ in scheme})
    errors_b = _column_errors(b, widths, ladder.group_size, None if identity else weights.square())
    errors_a = _column_errors(a, widths, ladder.group_size, None if identity else statistics.diagonal)
    after = energy_after(eigenvalues, total)
    if fixed is not None:
        found = []
        for spec in fixed:
            scheme = [list(block) for block in spec["scheme"]]
            if spec["rank"] in ranks and all(bits in errors_b and bits in errors_a for bits, _ in scheme):
                found.append(_sized(name, spec, matrix.shape, lowrank_cost(after, values, errors_b, errors_a, scheme)))
        return found
    results: dict[str, Candidate] = {}
    for scheme in schemes:
        if any(bits not in errors_b or bits not in errors_a for bits, _ in scheme):
            continue  # a grid beyond fp16: no scheme with this width
        for rank in ranks:
            resolved = [list(block) for block in resolve_scheme(scheme, rank)]
            spec = {"kind": "lowrank", "rank": rank, "group_size": ladder.group_size, "scheme": resolved}
            key = json.dumps(spec, sort_keys=True)
            if key not in results:
                results[key] = _sized(name, spec, matrix.shape, lowrank_cost(after, values, errors_b, errors_a, resolved))
    return list(results.values())


def _measured(name, matrix, packed: CompressedDelta, spec, statistics) -> Candidate:
    error = packed.delta().sub_(matrix)  # a fresh decode, negated error: the cost is the same
    cost = statistics.cost(error) if statistics is not None else squared_norm(error)
    del error
    nbytes = payload_size(segment_layout(packed.meta)) + ENTRY_BYTES
    return Candidate(nbytes, cost, dict(spec))


def _specs(matrix: torch.Tensor, sparse: bool, ladder: CandidateLadder) -> list[dict]:
    """The direct-quantization and sparse specs of the ladder for ``matrix``."""
    rows, cols = matrix.shape
    specs = []
    for bits in ladder.quant_bits:
        for size in dict.fromkeys(min(size or rows, rows) for size in ladder.quant_group_sizes):
            specs.append({"kind": "quant", "bits": bits, "group_size": size})
    if 1 in ladder.quant_bits:
        for fraction in ladder.residual_ranks:
            rank = max(1, round(fraction * min(rows, cols)))
            specs.append({"kind": "quant", "bits": 1, "group_size": rows, "rank": rank,
                          "scheme": [list(b) for b in resolve_scheme(ladder.residual_scheme, rank)],
                          "residual_group_size": ladder.group_size})
    if sparse:
        specs += [{"kind": "sparse", "keep_fraction": fraction} for fraction in ladder.keep_fractions]
    return specs


def _lowrank_candidates(name: str, matrix: torch.Tensor, statistics: ModuleStatistics, ladder: CandidateLadder) -> list[Candidate]:
    """Low-rank candidates at every (rank, scheme) of the ladder, from one activation-weighted SVD.

    The SVD is of ``diag(sqrt(f)) dW L`` (``L L^T = H``), so the kept directions are those whose
    loss costs most; ranks are where its spectrum reaches each of ``ladder.energies``. Each bit
    width quantizes the factors once (round to nearest on fitted grids), and each candidate's
    error is measured exactly under ``statistics`` from the columns its scheme takes. The stored
    pack refines the chosen one with GPTQ (:func:`~.calibrate.compress_delta_calibrated`), so its
    error is at most the one measured here, up to GPTQ's damping.
    """
    oriented = statistics.oriented(matrix)
    rows, cols = oriented.shape
    weights = statistics.row_weights.clamp_min(0)
    weights = (weights + 0.01 * float(weights.mean().clamp_min(1e-30))).sqrt()
    diagonal = statistics.is_diagonal
    root = _root(statistics.compact_hessian)
    scaled = oriented * weights[:, None]
    scaled = scaled.mul_(root[None, :]) if diagonal else scaled @ root
    spectrum = lowrank_factors(scaled, energy=max(ladder.energies))
    del scaled
    ranks = sorted({min(max(rank_for_energy(spectrum.singular_values, spectrum.total_energy, e), 1), spectrum.rank)
                    for e in ladder.energies})
    ranks = [rank for rank in ranks if rank * (rows + cols) < rows * cols]  # else the factors outweigh the matrix
    if not ranks:
        return []
    b = spectrum.b[:, : max(ranks)] / weights[:, None]  # [out, r]
    # [in, r]: A^T with A L = a
    a = spectrum.a[: max(ranks)].T
    a = a / root[:, None] if diagonal else torch.linalg.solve_triangular(root.T, a, upper=True)
    del spectrum
    schemes = {tuple(map(tuple, resolve_scheme(s, max(ranks)))) for s in ladder.schemes}
    widths = {bits for scheme in schemes for bits, _ in scheme}
    quantized = {}  # codes and grids, decoded a few columns at a time for each candidate
    for bits in widths:
        try:
            quantized[bits] = (quantize(b, bits, ladder.group_size, clip=True), quantize(a, bits, ladder.group_size, clip=True))
        except HfGraftError:
            continue
    del a, b
    results: dict[str, Candidate] = {}
    for scheme in schemes:
        if any(bits not in quantized for bits, _ in scheme):
            continue
        for rank in ranks:
            spec = {"kind": "lowrank", "rank": rank, "group_size": ladder.group_size,
                    "scheme": [list(block) for block in resolve_scheme(scheme, rank)]}
            key = json.dumps(spec, sort_keys=True)
            if key in results:
                continue
            b_q, a_q = (_decoded_columns(quantized, spec["scheme"], side) for side in (0, 1))
            meta = {**spec, "shape": list(matrix.shape)}
            nbytes = payload_size(segment_layout(meta)) + ENTRY_BYTES
            results[key] = Candidate(nbytes, _factored_cost(statistics, oriented, b_q, a_q), spec)
            del b_q, a_q
    return list(results.values())


def _decoded_columns(quantized: Mapping[int, tuple], scheme, side: int) -> torch.Tensor:
    """Columns ``0:rank`` of a factor, each block of ``scheme`` decoded from its width's codes."""
    parts, start = [], 0
    for bits, columns in scheme:
        parts.append(quantized[bits][side].dequantize_columns(start, start + columns))
        start += columns
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _factored_cost(statistics: ModuleStatistics, oriented: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """The cost of ``oriented - b @ a.T`` (``[out, in]``), made a block of rows at a time."""
    if statistics.transposed and statistics.also:
        return statistics.cost(statistics.oriented(oriented - b @ a.T))
    flat = dataclasses.replace(statistics, transposed=False)
    step = max(1, FACTOR_CHUNK_BYTES // (4 * oriented.shape[1]))
    total = 0.0
    for start in range(0, len(oriented), step):
        stop = min(len(oriented), start + step)
        total += flat.rows(start, stop).cost(torch.addmm(oriented[start:stop], b[start:stop], a.T, alpha=-1))
    return total


def _root(hessian: torch.Tensor) -> torch.Tensor:
    """A square root of the (damped) Hessian, for the activation-weighted spectrum (of its diagonal for a 1-D one)."""
    if hessian.dim() == 1:
        return (hessian.double() + 0.01 * float(hessian.double().mean().clamp_min(1e-30))).sqrt().float()
    return damped_cholesky(hessian.float(), DEFAULT_DAMPING)  # float32: the 1% damping bounds its condition; shared with GPTQ


def select(
    candidates: Mapping[str, Sequence[Candidate]], byte_budget: int, *, resolution: int = 20_000
) -> dict[str, Candidate]:
    """Pick one candidate per module: the least total cost with total bytes <= ``byte_budget``.

    A multiple-choice knapsack, solved exactly by dynamic programming over bytes counted in whole
    units of ``1 / resolution`` of the largest SkillPack the candidates can make, each candidate's
    size rounded up. So the result never exceeds the budget; its cost is at most that of the exact
    optimum for a budget smaller by one unit per module; and the total cost never rises when the
    budget grows, since the unit does not depend on the budget and a larger one only adds choices.
    (A greedy walk along each module's convex hull of (bytes, cost) is cheaper, but strands bytes
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
    # best[u]: least cost of the modules so far within u units; picks[m, u]: module m's choice there.
    best = np.zeros(capacity + 1)
    picks = np.full((len(names), capacity + 1), -1, dtype=np.int32)
    for module, frontier in enumerate(options):
        reached = np.full(capacity + 1, np.inf)
        for index, candidate in enumerate(frontier):
            units = -(-candidate.nbytes // unit)
            if units > capacity:
                break
            total = best[: capacity + 1 - units] + candidate.cost
            better = total < reached[units:]
            reached[units:][better] = total[better]
            picks[module, units:][better] = index
        best = reached
    if not np.isfinite(best[capacity]):
        cheapest = sum(frontier[0].nbytes for frontier in options)
        raise HfGraftError(
            f"A budget of {byte_budget} bytes is below the {cheapest} bytes of the cheapest candidates; "
            "allow more bytes (a lower target_ratio) or add cheaper candidates."
        )
    chosen: dict[str, Candidate] = {}
    units_left = capacity
    for module in reversed(range(len(names))):
        candidate = options[module][picks[module, units_left]]
        chosen[names[module]] = candidate
        units_left -= -(-candidate.nbytes // unit)
    return {name: chosen[name] for name in names}


def _frontier(options: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both counts, by increasing bytes (and decreasing cost)."""
    frontier: list[Candidate] = []
    for candidate in sorted(options):
        if not frontier or candidate.cost < frontier[-1].cost:
            frontier.append(candidate)
    return frontier


def allocate(
    deltas: Mapping[str, torch.Tensor],
    target_ratio: float | None = None,
    byte_budget: int | None = None,
    *,
    sparse: Collection[str] = (),
    statistics: Mapping[str, ModuleStatistics] | None = None,
    ladder: CandidateLadder = CandidateLadder(),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Choose a spec per delta (``{"module.part": tensor}``) so they fit the budget at the least total cost.

    The budget is ``byte_budget`` bytes, or the bf16 size of all ``deltas`` divided by
    ``target_ratio`` (give exactly one), counting each delta's payload, header entry and metadata.
    Deltas named in ``sparse`` also get pruning candidates; ``statistics`` (per module name, see
    :mod:`.objective`) weigh errors by what they cost the model, else the Frobenius error counts.
    Modules whose delta is best left out get :data:`OMIT`.
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
    statistics = statistics or {}
    measured = {
        name: measure_candidates(name, deltas[name], statistics.get(name.rsplit(".", 1)[0]), sparse=name in sparse, ladder=ladder)
        for name in tqdm(deltas, desc="Measuring SkillPack candidates", disable=not progress)
    }
    return {name: choice.spec for name, choice in select(measured, byte_budget).items()}
