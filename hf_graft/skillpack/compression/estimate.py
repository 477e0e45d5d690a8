"""Candidate costs predicted, not tried: one factorization and a few passes per delta.

Measuring a candidate by compressing the delta and decoding it costs a pass over the matrix per
candidate (and 15 per fitted grid, one per clip ratio). What the ladder needs is each candidate's
cost, and most of it is known in closed form:

- **Low rank.** With the delta factored once, ``dW = sum_k s_k u_k v_k^T`` (in the space where the
  objective is the plain squared error, :mod:`.objective`), the balanced factors ``B = U S^1/2``
  and ``A = S^1/2 V^T`` have orthogonal columns and rows of squared norm ``s_k``. The error of
  ``B_q A_q`` at rank ``r`` is then the energy past ``r``, ``sum_{k>=r} s_k^2`` (orthogonal to all
  the rest), plus ``sum_{k<r} s_k (||e^B_k||^2 + ||e^A_k||^2)`` where ``e_k`` are the quantization
  errors of column ``k`` of each factor (cross terms vanish for errors independent of each other,
  and the product of two errors is of second order). So every (rank, scheme) pair costs a sum
  over columns, once each column's quantization error is known at each width.
- **Round to nearest on fitted grids** (direct quantization, and factor columns): the error of a
  group's grid scales with the square of the group's range, ``n (max - min)^2 / 12 / (2^b - 1)^2``
  for values spread over it. One pass gives every group's range; the grid search itself
  (:func:`~.quantize.fitted_grid`, clip ratios included) runs for real on a sample of columns,
  and the ratio of the sample's true errors to its range proxy scales the proxy of all columns
  (a ratio estimator: the columns' scales cancel, only the values' shape within groups is
  sampled). Where the statistics are the identity GPTQ is round to nearest, so this is its cost.
- **Sparse** (entries kept by their score ``f_i H_jj dW_ij^2``): the cost is the scores of the
  dropped entries. One pass bins the scores by their top 16 bits (counts and sums): the
  ``k`` largest sum to the bins above the ``k``-th score plus its share of that bin.

Only the chosen candidate is then compressed for real (:mod:`..extraction.packing`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch

from .quantize import fitted_grid

__all__ = ["SAMPLE_COLUMNS", "ScoreBins", "column_errors", "energy_after", "grid_costs", "lowrank_cost", "sparse_costs"]

#: Columns of a matrix on which grids are fitted for real, per width (all of them when fewer).
SAMPLE_COLUMNS = 64

#: Scores binned at a time by :func:`sparse_costs`.
SCORE_BLOCK_ENTRIES = 1 << 20

_HIGH_BINS = 1 << 15


def _grouped(values: torch.Tensor, group_size: int, row_weights: Optional[torch.Tensor]):
    """``values`` ``[rows, cols]`` as ``[groups, group_size, cols]`` (padding rows repeat the last row,
    as :func:`~.quantize.quantize` pads) and the rows' weights ``[groups, group_size, 1]`` (0 on padding)."""
    rows, cols = values.shape
    groups = -(-rows // group_size)
    padding = groups * group_size - rows
    padded = torch.cat([values, values[-1:].expand(padding, cols)]) if padding else values
    weights = torch.ones(rows, device=values.device) if row_weights is None else row_weights.float()
    weights = torch.cat([weights, weights.new_zeros(padding)]) if padding else weights
    return padded.reshape(groups, group_size, cols), weights.reshape(groups, group_size, 1)


def _sample(cols: int) -> torch.Tensor:
    """Evenly spaced column indices, :data:`SAMPLE_COLUMNS` of them (all when fewer), the first included."""
    if cols <= SAMPLE_COLUMNS:
        return torch.arange(cols)
    return torch.linspace(0, cols - 1, SAMPLE_COLUMNS).round().long().unique()


def column_errors(
    values: torch.Tensor, widths: Iterable[int], group_size: int, row_weights: Optional[torch.Tensor] = None
) -> dict[int, torch.Tensor]:
    """Each column's weighted squared error ``sum_i w_i (q(x_i) - x_i)^2`` once quantized to each width
    as :func:`~.quantize.quantize` with ``clip=True`` stores it (``group_size`` rows per grid), predicted.

    Returns ``{bits: [cols] float64}``; ``row_weights`` (``[rows]``, default ones) weigh the rows.
    The sampled columns' errors are exact; the others are their range proxy times the sample's ratio.
    """
    values = values.detach().float()
    grouped, weights = _grouped(values, min(group_size, len(values)), row_weights)
    spread = (grouped.amax(dim=1) - grouped.amin(dim=1)).double().square_()  # [groups, cols]
    proxy = (spread * weights.sum(dim=1).double()).sum(dim=0)  # [cols]
    sample = _sample(values.shape[1]).to(values.device)
    picked = grouped[:, :, sample]
    errors = {}
    for bits in widths:
        exact = _fitted_errors(picked, weights, bits)  # [len(sample)]
        base = float(proxy[sample].sum())
        ratio = float(exact.sum()) / base if base > 0 else 0.0
        estimate = proxy * ratio
        estimate[sample] = exact
        errors[bits] = estimate
    return errors


def grid_costs(
    values: torch.Tensor,
    widths: Iterable[int],
    group_size: int,
    row_weights: Optional[torch.Tensor] = None,
    col_weights: Optional[torch.Tensor] = None,
) -> dict[int, float]:
    """The weighted squared error ``sum_ij r_i c_j (q(x_ij) - x_ij)^2`` of quantizing ``values`` to each
    width (fitted grids of ``group_size`` rows per column), predicted as :func:`column_errors` does."""
    found = column_errors(values, widths, group_size, row_weights)
    if col_weights is None:
        return {bits: float(errors.sum()) for bits, errors in found.items()}
    return {bits: float(errors @ col_weights.double()) for bits, errors in found.items()}


def _fitted_errors(grouped: torch.Tensor, weights: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact weighted squared error per column of ``grouped`` on the grids :func:`fitted_grid` picks."""
    scales, zeros = (grid.float()[:, None, :] for grid in fitted_grid(grouped, bits))
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    decoded = (grouped - zeros).div_(divisor).round_().clamp_(0, (1 << bits) - 1).mul_(scales).add_(zeros)
    return decoded.sub_(grouped).square_().mul_(weights).sum(dim=(0, 1)).double()


class ScoreBins:
    """Non-negative scores binned by their top 16 bits (counts and sums), added a block at a time."""

    def __init__(self):
        self.count = torch.zeros(_HIGH_BINS, dtype=torch.float64)
        self.summed = torch.zeros(_HIGH_BINS, dtype=torch.float64)
        self.numel = 0

    def add(self, block: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Bin ``block``'s scores; sum ``values`` (the scores themselves by default) into their bins."""
        flat = block.detach().float().reshape(-1).abs()
        summed = flat if values is None else values.detach().float().reshape(-1)
        for part, value in zip(flat.split(SCORE_BLOCK_ENTRIES), summed.split(SCORE_BLOCK_ENTRIES)):
            high = (part.view(torch.int32) >> 16).long()
            self.count += torch.bincount(high, minlength=_HIGH_BINS).double().cpu()
            self.summed += torch.bincount(high, weights=value.double(), minlength=_HIGH_BINS).cpu()
        self.numel += flat.numel()

    def costs(self, counts: Iterable[int]) -> list[float]:
        """For each ``k``: the sum of the values of all the entries but those of the ``k`` largest scores
        (the ``k``-th score's bin counted at its mean value; bins are 1/128 of an octave wide)."""
        total = float(self.summed.sum())
        count_above = self.count.flip(0).cumsum(0).flip(0)  # scores in bins >= b
        sum_above = self.summed.flip(0).cumsum(0).flip(0)
        found = []
        for k in counts:
            if k <= 0 or k >= self.numel:
                found.append(total if k <= 0 else 0.0)
                continue
            bin_ = int(torch.nonzero(count_above >= k).max())
            above = float(count_above[bin_ + 1]) if bin_ + 1 < _HIGH_BINS else 0.0
            above_sum = float(sum_above[bin_ + 1]) if bin_ + 1 < _HIGH_BINS else 0.0
            mean = float(self.summed[bin_] / self.count[bin_])
            found.append(max(0.0, total - above_sum - (k - above) * mean))
        return found


def sparse_costs(score_blocks: Iterable, counts: Iterable[int]) -> list[float]:
    """For each ``k`` in ``counts``: the sum of all the non-negative scores but the ``k`` largest,
    from one pass over ``score_blocks`` (:class:`ScoreBins`; temporaries of a block's size). A block
    may be ``(scores, values)``: entries ranked by ``scores``, their ``values`` summed."""
    bins = ScoreBins()
    for block in score_blocks:
        bins.add(*block) if isinstance(block, tuple) else bins.add(block)
    return bins.costs(counts)


def energy_after(eigenvalues: torch.Tensor, total: float) -> torch.Tensor:
    """``after[r]``: the energy ``total - sum(eigenvalues[:r])`` a rank-``r`` truncation leaves out (float64, ``r = 0..n``)."""
    kept = torch.cat([eigenvalues.new_zeros(1, dtype=torch.float64), eigenvalues.double().cumsum(0)])
    return (total - kept).clamp_min_(0.0)


def lowrank_cost(after: torch.Tensor, values: torch.Tensor, errors_b, errors_a, scheme) -> float:
    """The predicted cost of a rank-``r`` candidate stored with ``scheme`` (``[[bits, columns], ...]``):
    the energy past ``r`` plus each kept column's quantization errors weighted by its singular value."""
    rank = sum(columns for _, columns in scheme)
    cost, start = float(after[rank]), 0
    for bits, columns in scheme:
        part = slice(start, start + columns)
        cost += float((values[part].double() * (errors_b[bits][part] + errors_a[bits][part])).sum())
        start += columns
    return cost
