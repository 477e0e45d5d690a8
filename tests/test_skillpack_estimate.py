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


@pytest.mark.parametrize("transposed", [False, True])
def test_gptq_costs_are_predicted_from_its_own_error_accounting(transposed):
    """Correlated inputs: GPTQ's error is predicted (rounding errors weighted by 1 / U_jj^2), never run."""
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(2048, 128, generator=generator) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=generator) / 11.3)
    inputs = inputs * torch.exp(0.7 * torch.randn(128, generator=generator))
    statistics = ModuleStatistics((inputs.T @ inputs) / len(inputs), torch.rand(256, generator=generator) + 0.2, transposed=transposed)
    delta = fine_tune_delta(256, 128, seed=5)
    delta = delta.T.contiguous() if transposed else delta
    tried = measure_candidates("m.weight", delta, statistics, ladder=CandidateLadder(search="exhaustive"))
    predicted = measure_candidates("m.weight", delta, statistics, ladder=CandidateLadder(search="predicted"))
    real = {repr(sorted(c.spec.items())): c for c in tried}
    quant = [c for c in predicted if c.spec["kind"] == "quant" and "rank" not in c.spec]
    assert len(quant) == len([c for c in tried if c.spec["kind"] == "quant" and "rank" not in c.spec]) >= 4
    for guess in quant:
        assert guess.cost == pytest.approx(real[repr(sorted(guess.spec.items()))].cost, rel=0.08)


@pytest.mark.parametrize("calibrated", [False, True])
def test_one_bit_corrections_are_predicted_as_low_rank_of_what_the_signs_leave(calibrated):
    """1-bit signs plus a low-rank correction: the signs quantized once, the corrections costed in closed form."""
    from hf_graft.skillpack.compression import allocation

    generator = torch.Generator().manual_seed(8)
    delta = fine_tune_delta(512, 384, seed=9)
    inputs = torch.randn(2048, 384, generator=generator) @ (torch.eye(384) + 0.3 * torch.randn(384, 384, generator=generator) / 19.6)
    statistics = (ModuleStatistics((inputs.T @ inputs) / len(inputs), torch.rand(512, generator=generator) + 0.5) if calibrated
                  else ModuleStatistics.identity(delta.shape))
    ladder = CandidateLadder()
    specs = [spec for spec in allocation._specs(delta, False, ladder) if "rank" in spec]
    tried = allocation._tried("m.weight", delta, statistics, specs)
    signs = allocation.quantize_calibrated(delta, 1, 512, statistics)
    predicted = allocation._predicted_lowrank("m.weight", delta - signs.dequantize(), statistics, ladder, fixed=specs)
    assert [c.spec for c in predicted] == [c.spec for c in tried] and len(tried) == 2
    for guess, real in zip(predicted, tried):
        assert guess.nbytes == real.nbytes
        assert guess.cost == pytest.approx(real.cost, rel=0.05)


def test_the_basis_kept_by_measuring_compresses_the_chosen_rank_as_a_new_factorization_does():
    from hf_graft.skillpack.compression.calibrate import compress_with_statistics

    delta = fine_tune_delta(384, 256)
    kept = []
    candidates = measure_candidates("m.weight", delta, None, keep_basis=kept.append)
    assert len(kept) == 1 and kept[0].shape[0] == 256  # A^T: [in, r]
    spec = next(c.spec for c in candidates if c.spec["kind"] == "lowrank" and c.spec["rank"] > 20)
    statistics = ModuleStatistics.identity(delta.shape)
    again, reused = (compress_with_statistics(delta, spec, statistics, basis=basis) for basis in (None, kept[0]))
    errors = [float((packed.delta() - delta).square().sum()) for packed in (again, reused)]
    assert errors[1] == pytest.approx(errors[0], rel=0.03)  # the new factorization is a randomized one
    with pytest.raises(Exception, match="does not hold rank"):
        compress_with_statistics(delta, {**spec, "rank": kept[0].shape[1] + 1, "scheme": [[2, None]]}, statistics, basis=kept[0])


def test_a_tied_embedding_adds_the_heads_cost_to_every_prediction():
    """Tied embedding and head: the head's dense statistics, the embedding's diagonal ones as a second use."""
    generator = torch.Generator().manual_seed(6)
    delta = fine_tune_delta(400, 96, seed=7)
    inputs = torch.randn(1024, 96, generator=generator) @ (torch.eye(96) + 0.2 * torch.randn(96, 96, generator=generator) / 9.8)
    head = ModuleStatistics((inputs.T @ inputs) / len(inputs), torch.rand(400, generator=generator) + 0.2)
    embedding = ModuleStatistics(torch.rand(96, generator=generator) + 0.5, torch.rand(400, generator=generator) * 3)
    tied = ModuleStatistics(head.hessian, head.row_weights, also=(embedding,))
    name = "model.embed_tokens.weight"
    tried = measure_candidates(name, delta, tied, sparse=True, ladder=CandidateLadder(search="exhaustive"))
    predicted = measure_candidates(name, delta, tied, sparse=True, ladder=CandidateLadder(search="predicted"))
    real = {repr(sorted(c.spec.items())): c for c in tried}
    compared = {"quant": 0, "sparse": 0, "lowrank": 0}
    for guess in predicted:
        match = real.get(repr(sorted(guess.spec.items())))
        if match is None or guess.spec["kind"] == "omit":
            continue
        compared[guess.spec["kind"]] += 1
        tolerance = {"quant": 0.1, "sparse": 0.1, "lowrank": 0.2}[guess.spec["kind"]]
        assert guess.cost == pytest.approx(match.cost, rel=tolerance), guess.spec
    assert min(compared.values()) >= 4
