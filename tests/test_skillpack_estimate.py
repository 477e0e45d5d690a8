"""Predicted candidate costs (hf_graft.skillpack.compression.estimate) against the candidates compressed for real."""

import math

import pytest
import torch

from hf_graft.skillpack.compression.allocation import CandidateLadder, _frontier, measure_candidates
from hf_graft.skillpack.compression.estimate import SAMPLE_COLUMNS, column_errors, grid_costs, sparse_costs
from hf_graft.skillpack.compression.objective import ModuleStatistics
from hf_graft.skillpack.compression.quantize import quantize


def fine_tune_delta(rows, cols, seed=0):
    """A power-law top of 32 directions plus a full-rank tail holding 30% of the energy, columns of unequal scale."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, 33, dtype=torch.float32) ** -1.0
    top = (torch.randn(rows, 32, generator=generator) * spectrum) @ torch.randn(32, cols, generator=generator)
    top *= math.sqrt(0.7 / float(top.square().mean()))
    tail = math.sqrt(0.3) * torch.randn(rows, cols, generator=generator)
    scales = torch.exp(0.5 * torch.randn(cols, generator=generator))
    return 0.002 * (top + tail) * scales


@pytest.mark.parametrize("bits, group_size", [(1, 512), (2, 128), (3, 128), (4, 64)])
def test_grid_costs_predict_the_fitted_quantization_error(bits, group_size):
    delta = fine_tune_delta(512, 384)
    exact = float((quantize(delta, bits, group_size, clip=True).dequantize() - delta).double().square().sum())
    predicted = grid_costs(delta, [bits], group_size)[bits]
    assert predicted == pytest.approx(exact, rel=0.05)


def test_grid_costs_weigh_rows_and_columns():
    delta = fine_tune_delta(256, 200)
    generator = torch.Generator().manual_seed(1)
    rows, cols = torch.rand(256, generator=generator) + 0.1, torch.rand(200, generator=generator) + 0.1
    error = (quantize(delta, 2, 128, clip=True).dequantize() - delta).double().square()
    exact = float((error * rows[:, None].double() * cols[None, :].double()).sum())
    assert grid_costs(delta, [2], 128, rows, cols)[2] == pytest.approx(exact, rel=0.05)


def test_sampled_columns_are_exact_and_narrow_matrices_are_all_sampled():
    delta = fine_tune_delta(256, SAMPLE_COLUMNS)
    errors = column_errors(delta, [3], 128)[3]
    exact = (quantize(delta, 3, 128, clip=True).dequantize() - delta).double().square().sum(dim=0)
    assert torch.allclose(errors, exact, rtol=1e-5)


def test_sparse_costs_match_the_dropped_scores():
    scores = torch.rand(300_000, generator=torch.Generator().manual_seed(2)).pow(4)
    ordered = scores.double().sort(descending=True).values
    counts = [0, 1, 3000, 15000, 150_000, 300_000]
    found = sparse_costs(iter(scores.split(70_000)), counts)
    for count, cost in zip(counts, found):
        assert cost == pytest.approx(float(ordered[count:].sum()), rel=2e-3, abs=1e-9)


@pytest.mark.parametrize("shape", [(512, 256), (256, 512)])
def test_predicted_ladder_keeps_the_exhaustive_frontier(shape):
    delta = fine_tune_delta(*shape)
    name = "model.embed_tokens.weight"  # with the pruning ladder of embeddings
    tried = measure_candidates(name, delta, None, sparse=True, ladder=CandidateLadder(search="exhaustive"))
    predicted = measure_candidates(name, delta, None, sparse=True, ladder=CandidateLadder(search="predicted"))
    by_spec = {repr(sorted(c.spec.items())): c for c in tried}
    matched = [(c, by_spec[repr(sorted(c.spec.items()))]) for c in predicted if repr(sorted(c.spec.items())) in by_spec]
    assert len(matched) >= len(predicted) - 2  # all but the 1-bit + correction formats, tried only where they compete
    for guess, real in matched:
        assert guess.nbytes == real.nbytes
        assert guess.cost == pytest.approx(real.cost, rel=0.06)
    spec_of = lambda frontier: [repr(sorted(c.spec.items())) for c in frontier]  # noqa: E731
    assert spec_of(_frontier(predicted)) == spec_of(_frontier(tried))


def test_predicted_ladder_under_diagonal_statistics_and_a_transposed_delta():
    delta = fine_tune_delta(384, 256)  # a Conv1D weight, [in, out]
    generator = torch.Generator().manual_seed(3)
    statistics = ModuleStatistics(torch.rand(384, generator=generator) + 0.5, torch.rand(256, generator=generator) + 0.5, transposed=True)
    name = "h.0.mlp.c_fc.weight"
    tried = measure_candidates(name, delta, statistics, ladder=CandidateLadder(search="exhaustive"))
    predicted = measure_candidates(name, delta, statistics, ladder=CandidateLadder(search="predicted"))
    by_spec = {repr(sorted(c.spec.items())): c for c in tried}
    for guess in predicted:
        real = by_spec.get(repr(sorted(guess.spec.items())))
        if real is not None and guess.spec["kind"] != "omit":
            # Low-rank costs are predicted in the floored objective the factorization weighs by (1% above).
            assert guess.cost == pytest.approx(real.cost, rel=0.08)


def test_a_bad_search_is_refused():
    from hf_graft.errors import HfGraftError

    with pytest.raises(HfGraftError, match="search must be 'predicted' or 'exhaustive'"):
        CandidateLadder(search="fast")
