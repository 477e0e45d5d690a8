"""Calibrated compression: quantization error compensated with real activations (GPTQ-style).

Uncalibrated compression minimises ``||dW - B A||_F``, but what a SkillPack changes is a layer's
*output* ``dW x``, and inputs ``x`` are far from isotropic. With ``H = E[x x^T]`` over a small
calibration set, the output error of a stored ``B_q A_q`` is ``tr((dW - B_q A_q) H (dW - B_q A_q)^T)``.
:func:`compress_delta_calibrated` lowers it in four steps:

0. The truncated SVD is taken of ``dW L`` with ``L L^T = H`` (activation-aware, as in SVD-LLM,
   Wang et al., 2024), so the kept directions are those that move the outputs most;
   ``A = a L^-1``.
1. ``A`` (``[rank, in]``) is quantized input column by input column with GPTQ's update (Frantar
   et al., 2023): each column's rounding error is pushed onto the columns not yet quantized
   through the inverse Cholesky factor of ``H``. Group grids are set when a group starts, from the
   values the earlier updates left, exactly as GPTQ does.
2. ``B`` is refitted to the quantized ``A_q`` by weighted least squares:
   ``B = dW H A_q^T (A_q H A_q^T)^-1``, which absorbs what step 1 could not.
3. ``B`` is quantized the same way, its inputs being ``A_q x`` (Hessian ``A_q H A_q^T``).

The stored format is unchanged (the same codes, scales and zeros as :func:`~.quantize.quantize`),
so calibrated and uncalibrated packs load alike. :func:`input_hessians` collects ``H`` for the
modules to compress with forward hooks, a few modules at a time so large models fit in memory.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import HfGraftError
from .bitpack import pack_bits
from .formats import CompressedDelta, compress_delta, normalize_spec
from .prune import prune
from .lowrank import lowrank_factors
from .objective import ModuleStatistics, SharedGrams
from .quantize import MixedPrecisionFactor, QuantizedMatrix, fitted_grid, quantize, quantize_factor, resolve_scheme

__all__ = ["compress_delta_calibrated", "compress_with_statistics", "gptq", "gptq_upper", "gptq_weights", "input_hessians", "quantize_calibrated"]

#: Added to the Hessian's diagonal, as a share of its mean (GPTQ's ``percdamp``).
DEFAULT_DAMPING = 0.01
#: Columns GPTQ quantizes between two updates of the columns after them (its reference block size).
GPTQ_BLOCK = 128
#: Columns of ``B`` whose grids are fitted together, on their values as compensated when the first
#: comes: as accurate as one column at a time (within 0.1% of the loss on a 2048 x 1024 delta).
GRID_SPAN = 8


def input_hessians(
    model: nn.Module,
    widths: Mapping[str, int],
    batches: Iterable[Any],
    *,
    modules: Optional[Mapping[str, nn.Module]] = None,
    max_bytes: int = 2 << 30,
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, E[x x^T])`` over the calibration inputs ``x`` of each named module.

    ``widths`` maps module names to their input width; names are looked up in ``modules``
    (default: ``model.named_modules()``). ``batches`` are model inputs: ``input_ids`` tensors or
    dicts of keyword arguments, run through ``model``. Hessians are gathered for as many modules as
    fit in ``max_bytes`` (float32) per pass over the batches and yielded before the next pass
    starts, so memory stays bounded on large models.
    """
    batches = list(batches)
    if not batches:
        raise HfGraftError("The calibration set is empty: give at least one batch of input_ids.")
    modules = dict(model.named_modules()) if modules is None else modules
    missing = [name for name in widths if name not in modules]
    if missing:
        raise HfGraftError(f"Calibration: the model has no module {missing[0]!r}.")
    for chunk in _chunks(list(widths), widths, max_bytes):
        sums = {name: torch.zeros(widths[name], widths[name], dtype=torch.float64) for name in chunk}
        counts, grams = dict.fromkeys(chunk, 0), SharedGrams()

        def hook(name):
            def accumulate(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                if x.shape[-1] != widths[name]:
                    raise HfGraftError(f"Calibration: {name} received inputs of width {x.shape[-1]}, not {widths[name]}.")
                sums[name].add_(grams(x).cpu())
                counts[name] += x.numel() // x.shape[-1]

            return accumulate

        handles = [modules[name].register_forward_pre_hook(hook(name), with_kwargs=True) for name in chunk]
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc=f"Calibrating {len(chunk)} modules", disable=not progress):
                    model(**batch) if isinstance(batch, Mapping) else model(input_ids=batch)
        finally:
            for handle in handles:
                handle.remove()
            grams.clear()
        for name in chunk:
            if not counts[name]:
                raise HfGraftError(f"Calibration: module {name!r} received no input; is it used in forward?")
            yield name, (sums.pop(name) / counts[name]).float()


def _chunks(names: list, widths: Mapping[str, int], max_bytes: int) -> Iterator[list]:
    chunk, used = [], 0
    for name in names:
        size = 4 * widths[name] ** 2
        if chunk and used + size > max_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size
    if chunk:
        yield chunk


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    block_size: int = GPTQ_BLOCK,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """Quantize ``weight`` (``[rows, cols]``) column by column, compensating errors through ``hessian``.

    ``quantize_column(j, upcoming)`` gets ``upcoming = W[:, j:block_end]`` as updated so far and
    returns the dequantized column ``j``; grids are set from ``upcoming`` when the first column
    they cover comes (as GPTQ fits a group's grid). Returns the dequantized matrix. Columns the
    calibration never activated (zero diagonal) are quantized without compensation. In float32,
    as GPTQ's reference implementation.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise HfGraftError(f"gptq: a [{rows}, {cols}] weight needs a [{cols}, {cols}] Hessian, got {tuple(hessian.shape)}.")
    work = weight.detach().float().T.clone(memory_format=torch.contiguous_format)  # [cols, rows]: each column contiguous, a copy
    upper = _inverse_cholesky(hessian.float(), damping)
    diagonal = upper.diagonal().tolist()
    result = torch.empty_like(work)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, errors = work[start:end], torch.empty(end - start, rows, dtype=work.dtype, device=work.device)
        for j in range(end - start):
            column = quantize_column(start + j, block[j:].T)
            result[start + j] = column
            error = torch.sub(block[j], column, out=errors[j]).div_(diagonal[start + j])
            block[j + 1 :].sub_(upper[start + j, start + j + 1 : end, None] * error)
        work[end:] -= upper[start:end, end:].T @ errors
    return result.T


def gptq_weights(
    hessian: torch.Tensor, shares: Mapping[Any, float], damping: float = DEFAULT_DAMPING, *, upper: Optional[torch.Tensor] = None
) -> dict[Any, torch.Tensor]:
    """Per format of ``shares`` (e.g. ``(group_size, bits)``): ``[in]``, what the rounding errors of each input column cost once
    GPTQ has run, relative to what round to nearest makes of the column's original values.

    GPTQ's own accounting charges quantizing column ``j`` ``e_j^2 / U_jj^2`` (``U``: the upper Cholesky
    factor of the damped ``H^-1``), where ``e_j`` rounds the column as updated by the compensations of
    the columns before it, ``w_j - sum_{k<j} e_k U_kj / U_kk``. Those updates widen the column, and its
    grid with it: with rounding errors a share ``s`` (the format's share: squared rounding error over squared
    values) of what is rounded, each column's error grows by ``g_j = 1 + s sum_{k<j} g_k (U_kj / U_kk)^2``
    (a unit lower-triangular system). The weight of column ``j`` is ``g_j / U_jj^2``; for a diagonal
    ``H`` it is ``H`` itself. ``upper``: ``U`` when already known (:func:`gptq_upper`).
    """
    if hessian.dim() == 1:
        return {key: hessian.float() for key in shares}
    upper = gptq_upper(hessian, damping) if upper is None else upper
    diagonal = upper.diagonal()
    spread = (upper / diagonal[:, None]).square_().triu_(1).T  # [j, k]: (U_kj / U_kk)^2 for k < j
    ones = torch.ones(len(upper), 1, dtype=upper.dtype, device=upper.device)
    identity = torch.eye(len(upper), dtype=upper.dtype, device=upper.device)
    found = {}
    for key, share in shares.items():
        growth = torch.linalg.solve_triangular(identity - share * spread, ones, upper=False, unitriangular=True)[:, 0]
        found[key] = (growth / diagonal.square()).float()
    return found


def gptq_upper(hessian: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The upper Cholesky factor of the damped ``H^-1`` GPTQ compensates errors through, in float32."""
    return _inverse_cholesky(hessian.float(), damping)


class _LastFactors:
    """The factors of the last Hessian of each size factored, so that measuring and compressing one module
    factor its Hessian once (low-rank candidates, GPTQ's predictions, 1-bit signs, the chosen format), even
    with the small Hessians of its low-rank factors factored in between. Held only while that Hessian lives."""

    def __init__(self):
        self.entries: dict[tuple, tuple] = {}  # shape -> (weak reference, version key, factors)

    def get(self, hessian: torch.Tensor, damping: float, kind: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        shape, key = tuple(hessian.shape), (hessian._version, hessian.dtype, damping)
        source, known, found = self.entries.get(shape, (None, None, None))
        if source is None or source() is not hessian or known != key:
            source, found = weakref.ref(hessian, functools.partial(self._forget, shape)), {}
            self.entries[shape] = (source, key, found)
        if kind not in found:
            found[kind] = make()
        return found[kind]

    def _forget(self, shape: tuple, source: weakref.ref) -> None:
        if self.entries.get(shape, (None,))[0] is source:  # not an earlier Hessian's
            del self.entries[shape]


_FACTORS = _LastFactors()


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``U^T U = H^-1``), ``H`` damped as :func:`damped_cholesky` does,
    from ``H``'s own Cholesky factor (GPTQ's way: ``H^-1`` from the factor, then its upper factor)."""
    return _FACTORS.get(
        hessian, damping, "inverse", lambda: torch.linalg.cholesky(torch.cholesky_inverse(damped_cholesky(hessian, damping)), upper=True),
    )


def damped_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower ``L`` with ``L L^T = H + d I``; unused inputs get a unit diagonal, ``d`` grows until ``H`` is definite."""
    return _FACTORS.get(hessian, damping, "cholesky", lambda: _cholesky_with_damping(hessian, damping))


def _cholesky_with_damping(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    hessian = hessian.clone()
    diagonal = torch.diagonal(hessian)
    diagonal[diagonal <= 0] = 1.0
    mean = float(diagonal.mean())
    for attempt in range(6):
        damped = hessian + damping * (10**attempt) * mean * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if not info:
            return factor
    raise HfGraftError("Calibration: the activation Hessian is not positive definite even after damping.")


class _RowGroupQuantizer:
    """GPTQ column quantizer for ``A`` (``[rank, in]``): row ``i`` at ``bits[i]``, a grid per ``group_size`` columns."""

    def __init__(self, bits: torch.Tensor, group_size: int, cols: int):
        self.bits, self.group_size = bits, group_size
        self.top = (2 ** bits - 1).float()  # each row's largest code
        self.bottom = torch.zeros_like(self.top)
        groups = -(-cols // group_size)
        self.codes = torch.zeros(len(bits), cols, dtype=torch.uint8, device=bits.device)
        self.scales = torch.zeros(len(bits), groups, dtype=torch.float16, device=bits.device)
        self.zeros = torch.zeros(len(bits), groups, dtype=torch.float16, device=bits.device)
        self.grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the current group's scales, zeros, divisors

    def __call__(self, index: int, upcoming: torch.Tensor) -> torch.Tensor:
        if index % self.group_size == 0:
            group, span = index // self.group_size, upcoming[:, : self.group_size]
            for width in self.bits.unique().tolist():
                rows = self.bits == width
                scales, zeros = fitted_grid(span[rows].T[None], width)
                self.scales[rows, group], self.zeros[rows, group] = scales[0], zeros[0]
            scales, zeros = self.scales[:, group].float(), self.zeros[:, group].float()
            self.grid = scales, zeros, torch.where(scales > 0, scales, torch.ones_like(scales))  # as :func:`encode`, each row to its width
        scales, zeros, divisor = self.grid
        codes = torch.round((upcoming[:, 0] - zeros) / divisor).clamp_(self.bottom, self.top)
        self.codes[:, index] = codes
        return codes.mul_(scales).add_(zeros)


class _ColumnQuantizer:
    """GPTQ column quantizer for ``B`` (``[out, rank]``): column ``j`` at ``bits[j]``, a grid per ``group_size`` rows.

    The grids of ``span`` columns (dividing GPTQ's block) are fitted together when the first of
    them comes, on the values as compensated so far, as GPTQ fits a group's grid when its first
    column comes.
    """

    def __init__(self, bits: torch.Tensor, group_size: int, rows: int, span: int):
        self.bits, self.group_size, self.rows, self.span = bits, group_size, rows, span
        self.tops = (2 ** bits - 1).tolist()  # each column's largest code
        groups = -(-rows // group_size)
        self.codes = torch.zeros(rows, len(bits), dtype=torch.uint8, device=bits.device)
        self.scales = torch.zeros(groups, len(bits), dtype=torch.float16, device=bits.device)
        self.zeros = torch.zeros(groups, len(bits), dtype=torch.float16, device=bits.device)
        self.expanded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the span's scales, zeros, divisors per row

    def __call__(self, index: int, upcoming: torch.Tensor) -> torch.Tensor:
        offset = index % self.span
        if offset == 0:
            self._fit(index, upcoming[:, : self.span])
        scales, zeros, divisor = (grid[:, offset] for grid in self.expanded)
        codes = torch.round((upcoming[:, 0] - zeros) / divisor).clamp_(0, self.tops[index])  # as :func:`encode`
        self.codes[:, index] = codes
        return codes.mul_(scales).add_(zeros)

    def _fit(self, start: int, values: torch.Tensor) -> None:
        groups, count = len(self.scales), values.shape[1]
        padded = torch.cat([values, values[-1:].expand(groups * self.group_size - self.rows, count)])
        grouped = padded.reshape(groups, self.group_size, count)
        bits = self.bits[start : start + count]
        for width in bits.unique().tolist():
            columns = (bits == width).nonzero()[:, 0]
            scales, zeros = fitted_grid(grouped[:, :, columns], width)
            self.scales[:, start + columns], self.zeros[:, start + columns] = scales, zeros
        part = slice(start, start + count)
        scales, zeros = (grid[:, part].float().repeat_interleave(self.group_size, dim=0)[: self.rows] for grid in (self.scales, self.zeros))
        self.expanded = scales, zeros, torch.where(scales > 0, scales, torch.ones_like(scales))


def _factor(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme, group_size: int):
    """A :class:`MixedPrecisionFactor` from ``[rows, rank]`` codes and ``[groups, rank]`` grids."""
    blocks, start = [], 0
    for bits, columns in scheme:
        part = slice(start, start + columns)
        blocks.append(
            QuantizedMatrix(
                packed=pack_bits(codes[:, part].contiguous(), bits),
                scales=scales[:, part].contiguous(),
                zeros=zeros[:, part].contiguous(),
                bits=bits,
                shape=(codes.shape[0], columns),
                group_size=group_size,
            )
        )
        start += columns
    return MixedPrecisionFactor(tuple(blocks))


def compress_with_statistics(
    delta: torch.Tensor, spec: Mapping[str, Any], statistics: ModuleStatistics, *, damping: float = DEFAULT_DAMPING,
    basis: Optional[torch.Tensor] = None,
) -> CompressedDelta:
    """Compress a 2-D ``delta`` as ``spec`` says, minimising its cost under ``statistics`` (:mod:`.objective`).

    ``quant`` runs GPTQ over the module's inputs, then fits its low-rank correction (if any) to
    what is left the same way; ``lowrank`` is :func:`compress_delta_calibrated`; ``sparse`` keeps
    the entries whose loss costs most (``f_i H_jj dW_ij^2``, the diagonal of the objective);
    ``dense_fp16`` is the delta in fp16. ``basis``: a low-rank spec's ``A^T``, from the balanced
    truncated SVD :func:`~.allocation.measure_candidates` made under the identity objective, so the
    delta is not factored again.
    """
    spec = normalize_spec(spec, delta.shape)
    matrix = delta.detach().float()
    if spec["kind"] == "lowrank":
        return compress_delta_calibrated(
            matrix, spec, statistics.compact_hessian, fan_in_fan_out=statistics.transposed,
            row_weights=statistics.row_weights, damping=damping, basis=basis,
        )
    if spec["kind"] == "sparse":
        oriented = statistics.oriented(matrix)
        saliency = oriented.square().mul_(statistics.row_weights[:, None]).mul_(statistics.diagonal[None, :])
        saliency = statistics.oriented(saliency)
        return CompressedDelta("sparse", tuple(delta.shape), sparse=prune(matrix, spec["keep_fraction"], scores=saliency))
    if spec["kind"] != "quant":
        return compress_delta(matrix, spec)
    quant = quantize_calibrated(matrix, spec["bits"], spec["group_size"], statistics, damping=damping)
    if "rank" not in spec:
        return CompressedDelta("quant", tuple(delta.shape), quant=quant)
    residual_spec = {"kind": "lowrank", "rank": spec["rank"], "scheme": spec["scheme"], "group_size": spec["residual_group_size"]}
    residual = compress_delta_calibrated(
        matrix - quant.dequantize(), residual_spec, statistics.compact_hessian, fan_in_fan_out=statistics.transposed,
        row_weights=statistics.row_weights, damping=damping,
    )
    return CompressedDelta("quant", tuple(delta.shape), quant=quant, a=residual.a, b=residual.b)


def quantize_calibrated(
    delta: torch.Tensor, bits: int, group_size: int, statistics: ModuleStatistics, *, damping: float = DEFAULT_DAMPING
) -> QuantizedMatrix:
    """``delta`` quantized in its own layout at ``bits``, GPTQ-compensated over the module's inputs.

    The stored grids run along the delta's rows, ``group_size`` rows per grid and column. For a
    ``[out, in]`` weight each input column gets its grids when GPTQ reaches it; for a ``[in, out]``
    (``Conv1D``) weight each output gets one grid per ``group_size`` inputs, set when the group starts.
    """
    rows, cols = delta.shape
    group_size = min(group_size, rows)
    if statistics.is_diagonal:  # no error can be compensated across inputs: GPTQ is fitted rounding
        return quantize(delta.detach().float(), bits, group_size, clip=True)
    weight = statistics.oriented(delta.detach().float())
    if statistics.transposed:
        quantizer = _RowGroupQuantizer(torch.full((cols,), bits, device=delta.device), group_size, rows)
        gptq(weight, statistics.hessian, quantizer, block_size=group_size, damping=damping)
        codes, scales, zeros = quantizer.codes.T, quantizer.scales.T, quantizer.zeros.T
    else:
        quantizer = _ColumnQuantizer(torch.full((cols,), bits, device=delta.device), group_size, rows, GRID_SPAN)
        gptq(weight, statistics.hessian, quantizer, block_size=GPTQ_BLOCK, damping=damping)
        codes, scales, zeros = quantizer.codes, quantizer.scales, quantizer.zeros
    return QuantizedMatrix(
        packed=pack_bits(codes.contiguous(), bits), scales=scales.contiguous(), zeros=zeros.contiguous(),
        bits=bits, shape=(rows, cols), group_size=group_size,
    )


def compress_delta_calibrated(
    delta: torch.Tensor,
    spec: Mapping[str, Any],
    hessian: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
    row_weights: Optional[torch.Tensor] = None,
    method: str = "randomized",
    damping: float = DEFAULT_DAMPING,
    basis: Optional[torch.Tensor] = None,
) -> CompressedDelta:
    """Compress a ``lowrank`` spec's delta with quantization error compensated through ``hessian``.

    ``hessian`` is ``E[x x^T]`` of the module's inputs (:func:`input_hessians`), ``[in, in]``, or its
    diagonal ``[in]`` when the inputs are uncorrelated (data-free, embeddings: then GPTQ has
    nothing to compensate on ``A`` and is fitted rounding, and both factors are rounded on fitted grids). ``delta`` is in the
    weight's own layout: ``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out`` (GPT-2's Conv1D).
    ``row_weights`` (``[out]``, the output sensitivities of :mod:`.objective`) make the truncated
    SVD keep the directions the loss reacts to. The result is stored exactly like
    :func:`~.compress.compress_delta`'s. ``basis`` (``[in, r >= rank]``, under the identity
    objective): ``A^T`` of the delta's balanced truncated SVD, already known (kept by
    :func:`~.allocation.measure_candidates`), so the delta is not factored again.
    """
    spec = normalize_spec(spec, delta.shape)
    if spec["kind"] != "lowrank":
        raise HfGraftError(f"Calibrated compression applies to 'lowrank' specs, got {spec['kind']!r}.")
    matrix = delta.detach().float()
    matrix = matrix.T if fan_in_fan_out else matrix
    out_features, in_features = matrix.shape
    if hessian.shape not in ((in_features, in_features), (in_features,)):
        raise HfGraftError(
            f"A delta with {in_features} inputs needs a [{in_features}, {in_features}] Hessian (or its diagonal), got {tuple(hessian.shape)}."
        )
    rank, group_size = spec["rank"], spec["group_size"]
    scheme = resolve_scheme(spec["scheme"], rank)
    bits = torch.tensor([width for width, columns in scheme for _ in range(columns)], device=delta.device)
    hessian = hessian.float()
    weights = _output_weights(row_weights, out_features, matrix.device)
    diagonal = hessian.dim() == 1
    if diagonal:
        if basis is None:
            root = _damped_root(hessian, damping)
            scaled = weights[:, None] * matrix * root[None, :]
            a_t = (lowrank_factors(scaled, energy=1.0, min_rank=rank, max_rank=rank, method=method).a / root[None, :]).T
            del scaled
        else:  # B is refitted below: only A's directions are needed
            if basis.dim() != 2 or basis.shape[0] != in_features or basis.shape[1] < rank:
                raise HfGraftError(f"A basis of shape {tuple(basis.shape)} does not hold rank {rank} of A^T ([{in_features}, r]).")
            a_t = basis[:, :rank].to(matrix.device)
        a_factor = quantize_factor(a_t, scheme, group_size, clip=True)
        a_q = a_factor.dequantize().T  # [rank, in]
        projected, target = (a_q * hessian[None, :]) @ a_q.T, (matrix * hessian[None, :]) @ a_q.T
    else:
        root = damped_cholesky(hessian, damping)
        factors = lowrank_factors(weights[:, None] * matrix @ root, energy=1.0, min_rank=rank, max_rank=rank, method=method)
        a = torch.linalg.solve_triangular(root.T, factors.a.T, upper=True).T  # A L = a
        a_quantizer = _RowGroupQuantizer(bits, group_size, in_features)
        a_q = gptq(a, hessian, a_quantizer, block_size=group_size, damping=damping)
        a_factor = _factor(a_quantizer.codes.T, a_quantizer.scales.T, a_quantizer.zeros.T, scheme, group_size)
        weighted = hessian @ a_q.T  # [in, rank]: no [out, in] x [in, in] product
        projected, target = a_q @ weighted, matrix @ weighted
    ridge = damping * float(torch.diagonal(projected).mean().clamp_min(1e-30)) * torch.eye(rank, device=hessian.device)
    b = torch.cholesky_solve(target.T, torch.linalg.cholesky(projected + ridge)).T  # positive definite: ridge
    if diagonal:
        # Uncorrelated inputs leave A_q's rows nearly orthogonal, and GPTQ of B over them nearly fitted
        # rounding (0.4% lower error on a 4096 x 1024 delta, at 4x the time): B is rounded on fitted grids.
        b_factor = quantize_factor(b, scheme, group_size, clip=True)
    else:
        b_quantizer = _ColumnQuantizer(bits, group_size, out_features, math.gcd(GRID_SPAN, group_size))
        gptq(b, projected, b_quantizer, block_size=group_size, damping=damping)
        b_factor = _factor(b_quantizer.codes, b_quantizer.scales, b_quantizer.zeros, scheme, group_size)
    if fan_in_fan_out:  # delta = (B A)^T = A^T B^T: the factors swap roles
        return CompressedDelta("lowrank", tuple(delta.shape), a=b_factor, b=a_factor)
    return CompressedDelta("lowrank", tuple(delta.shape), a=a_factor, b=b_factor)


def _damped_root(diagonal: torch.Tensor, damping: float) -> torch.Tensor:
    """The square root of a diagonal Hessian damped as :func:`damped_cholesky` damps a dense one."""
    diagonal = torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal))
    return (diagonal + damping * float(diagonal.mean())).sqrt()


def _output_weights(row_weights: Optional[torch.Tensor], rows: int, device=None) -> torch.Tensor:
    """``sqrt(f)`` of the output sensitivities, floored at 1% of their mean so no output is ignored outright."""
    if row_weights is None:
        return torch.ones(rows, device=device)
    weights = row_weights.float().clamp_min(0)
    return (weights + 0.01 * float(weights.mean().clamp_min(1e-30))).sqrt()
