"""Large deltas worked on by row blocks: the same codes, kept entries and costs as the whole matrix gives."""

import math

import pytest
import torch

import hf_graft.skillpack.compression.rowwise as rowwise
from hf_graft.skillpack.compression.allocation import ENTRY_BYTES, OMIT, CandidateLadder
from hf_graft.skillpack.compression.formats import compress_delta, payload_size, segment_layout
from hf_graft.skillpack.compression.objective import ModuleStatistics
from hf_graft.skillpack.compression.prune import kept_count, prune
from hf_graft.skillpack.compression.quantize import quantize
from hf_graft.skillpack.compression.rowwise import DeltaRows, compress_rows, measure_rows, squared_error


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(rowwise, "BLOCK_BYTES", 4 * 48 * 256)  # 256 rows of 48 columns per block


def _delta(rows=1000, cols=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator)


def _read_log(delta):
    """DeltaRows over ``delta`` that records which rows were read (never all at once)."""
    reads = []

    def read(start, stop):
        reads.append((start, stop))
        return delta[start:stop].clone()

    return DeltaRows(tuple(delta.shape), read), reads


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [128, 100])
def test_quantizing_by_row_blocks_gives_the_codes_of_the_whole_matrix(bits, group_size):
    delta = _delta()
    rows, reads = _read_log(delta)
    packed = compress_rows(rows, {"kind": "quant", "bits": bits, "group_size": group_size}, None)
    whole = quantize(delta, bits, group_size, clip=True)
    assert len(reads) > 1 and max(stop - start for start, stop in reads) < len(delta)
    for name in ("packed", "scales", "zeros"):
        assert torch.equal(getattr(packed.quant, name), getattr(whole, name)), name
    assert torch.equal(packed.delta(), whole.dequantize())


@pytest.mark.parametrize("fraction", [0.01, 0.3])  # int32 indices, then a bitmap
def test_pruning_by_row_blocks_keeps_the_entries_topk_keeps(fraction):
    delta = _delta(seed=1)  # distinct magnitudes: the kept set is unique
    packed = compress_rows(DeltaRows.of(delta), {"kind": "sparse", "keep_fraction": fraction}, None)
    whole = prune(delta, fraction)
    assert packed.sparse.format == whole.format == ("indices" if fraction < 0.03 else "bitmap")
    assert torch.equal(packed.sparse.values, whole.values)
    assert torch.equal(packed.sparse.to_dense(), whole.to_dense())
    assert packed.sparse.values.numel() == kept_count(delta.numel(), fraction)


def test_ties_at_the_cut_are_kept_in_row_major_order():
    delta = torch.zeros(1000, 48)
    delta[::7] = 0.5  # 143 rows of equal magnitude, more than the 2% kept
    delta[3, 5], delta[900, 1] = 2.0, -3.0
    packed = compress_rows(DeltaRows.of(delta), {"kind": "sparse", "keep_fraction": 0.02}, None)
    count = kept_count(delta.numel(), 0.02)
    dense = packed.sparse.to_dense()
    assert int(torch.count_nonzero(dense)) == count
    assert dense[3, 5] == 2.0 and dense[900, 1] == -3.0
    ties = torch.nonzero((delta == 0.5).reshape(-1)).reshape(-1)[: count - 2]
    assert torch.equal(torch.nonzero(dense.reshape(-1) == 0.5).reshape(-1), ties)


@pytest.mark.parametrize("search, tolerance", [("exhaustive", 1e-5), ("predicted", 0.05)])
def test_measured_costs_and_bytes_are_those_of_the_stored_deltas(search, tolerance):
    delta = _delta(seed=2)
    weights = torch.rand(len(delta)) + 0.1
    statistics = ModuleStatistics(torch.rand(delta.shape[1]) + 0.5, weights)  # diagonal, as for embeddings
    ladder = CandidateLadder(quant_bits=(2, 4), keep_fractions=(0.02, 0.2), search=search)
    candidates = measure_rows("model.embed_tokens.weight", DeltaRows.of(delta), statistics, sparse=True, ladder=ladder)
    specs = [c.spec for c in candidates]
    assert specs[0] == OMIT and {s["kind"] for s in specs[1:]} == {"quant", "sparse"}
    assert not any(s.get("group_size") is None and s["kind"] == "quant" for s in specs)  # no whole-column grids
    assert math.isclose(candidates[0].cost, statistics.cost(delta), rel_tol=1e-6)
    for candidate in candidates[1:]:
        packed = compress_rows(DeltaRows.of(delta), candidate.spec, statistics)
        assert math.isclose(candidate.cost, statistics.cost(packed.delta() - delta), rel_tol=tolerance), candidate.spec
        stored = payload_size(segment_layout(packed.meta)) + ENTRY_BYTES
        assert candidate.nbytes == stored == packed.nbytes + ENTRY_BYTES
    sparse = [c for c in candidates if c.spec["kind"] == "sparse"]
    assert sparse[0].cost > sparse[1].cost  # keeping more loses less


def test_statistics_split_by_rows_add_up():
    delta = _delta(rows=300, seed=3)
    hessian = torch.randn(48, 48)
    statistics = ModuleStatistics(hessian @ hessian.T, torch.rand(300), also=(ModuleStatistics(torch.rand(48), torch.rand(300)),))
    parts = sum(statistics.rows(start, start + 100).cost(delta[start:start + 100]) for start in (0, 100, 200))
    assert math.isclose(parts, statistics.cost(delta), rel_tol=1e-6)
    with pytest.raises(Exception, match="Conv1D"):
        ModuleStatistics(torch.ones(48), torch.ones(300), transposed=True).rows(0, 10)


@pytest.mark.parametrize("spec", [
    {"kind": "quant", "bits": 3, "group_size": 128}, {"kind": "quant", "bits": 1, "group_size": 64, "rank": 4},
    {"kind": "lowrank", "rank": 5}, {"kind": "sparse", "keep_fraction": 0.01}, {"kind": "sparse", "keep_fraction": 0.3},
    {"kind": "dense_fp16"},
])
def test_any_rows_of_a_stored_delta_decode_as_the_whole(spec):
    delta = _delta(seed=4)
    packed = compress_delta(delta, spec)
    whole = packed.delta()
    for start, stop in [(0, 1000), (3, 77), (128, 256), (999, 1000), (500, 500), (7, 993)]:
        assert torch.allclose(packed.delta_rows(start, stop), whole[start:stop], rtol=1e-6, atol=1e-6)
    assert math.isclose(squared_error(DeltaRows.of(delta), packed), float(((delta - whole).double() ** 2).sum()), rel_tol=1e-6)


def test_only_large_two_d_deltas_go_by_rows(monkeypatch):
    assert rowwise.is_large((128256, 2048)) and not rowwise.is_large((8192, 2048))
    assert not rowwise.is_large((128256 * 2048,)) and not rowwise.is_large((128256, 2048), transposed=True)
