"""SkillPack compression: bit-packing, quantization, low-rank factors, pruning, specs and the allocator."""

import json
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_graft.errors import HfGraftError
from hf_graft.safetensors_io import load_tensors, save_tensors
from hf_graft.skillpack.compression.bitpack import pack_bits, packed_size, unpack_bits
from hf_graft.skillpack.compression.allocation import ENTRY_BYTES, OMIT, CandidateLadder, allocate, measure_candidates, select
from hf_graft.skillpack.compression.calibrate import compress_with_statistics
from hf_graft.skillpack.compression.formats import CompressedDelta, compress_delta, normalize_spec, payload_size, segment_layout
from hf_graft.skillpack.compression.objective import ModuleStatistics
from hf_graft.skillpack.compression.lowrank import lowrank_factors, rank_for_energy, thin_svd
from hf_graft.skillpack.compression.prune import SparseDelta, prune, sparse_format, sparse_nbytes
from hf_graft.skillpack.compression.quantize import (
    DEFAULT_SCHEME,
    MixedPrecisionFactor,
    QuantizedMatrix,
    quantize,
    quantize_factor,
    quantized_nbytes,
    resolve_scheme,
)


def spectrum_matrix(rows: int, cols: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A ``[rows, cols]`` matrix with exactly the given singular values (random singular vectors)."""
    generator = torch.Generator().manual_seed(seed)
    k = singular_values.numel()
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator)).Q
    return (u * singular_values) @ v.T


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# --- bit-packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_round_trip_and_layout(bits, count):
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
    # The layout is one little-endian bitstream: code i holds bits [i * bits, (i + 1) * bits).
    stream = np.unpackbits(codes.numpy()[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    assert np.array_equal(packed.numpy(), np.packbits(stream, bitorder="little"))
    assert torch.equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_unpack_bits_reads_only_the_bytes_of_the_codes_asked_for(bits):
    # A prefix of a 1 TiB stream (a zero-stride view, nothing allocated): decoding the first codes
    # of a large delta's rows must not touch the rest of its packed codes.
    stream = torch.full((1,), 0b10110101, dtype=torch.uint8).expand(1 << 40)
    codes = unpack_bits(stream, bits, 24)
    assert torch.equal(codes, unpack_bits(torch.full((packed_size(24, bits),), 0b10110101, dtype=torch.uint8), bits, 24))
    assert codes.numel() == 24


def test_two_bit_codes_take_a_quarter_byte():
    assert pack_bits(torch.zeros(1000, dtype=torch.uint8), 2).numel() == 250
    assert pack_bits(torch.full((1001,), 3, dtype=torch.uint8), 2).numel() == 251


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=70))))
def test_pack_bits_round_trip_property(case):
    bits, values = case
    codes = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, len(values)), codes)


def test_pack_bits_rejects_bad_input():
    with pytest.raises(HfGraftError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(HfGraftError, match="uint8 tensor of codes, got torch.int64"):
        pack_bits(torch.tensor([1]), 2)
    with pytest.raises(HfGraftError, match="bits must be an int from 1 to 8"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(HfGraftError, match="10 codes of 4 bits need 5 bytes, the packed data holds 4"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 4, 10)
    with pytest.raises(HfGraftError, match="1-D uint8 tensor"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.uint8), 4, 1)


# --- quantization --------------------------------------------------------------------------------


def columns_of_mixed_scale(rows: int = 200, cols: int = 12) -> torch.Tensor:
    """Columns spanning four decades of magnitude, one of them constant and one zero."""
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, cols)
    matrix[:, 3] = 0.3
    matrix[:, 4] = 0.0
    return matrix


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_error_is_within_half_a_scale(bits):
    matrix = columns_of_mixed_scale()
    quantized = quantize(matrix, bits, group_size=64)  # 200 rows: groups of 64, 64, 64 and 8
    assert quantized.scales.shape == quantized.zeros.shape == (4, 12)
    assert quantized.scales.dtype == quantized.zeros.dtype == torch.float16
    scale = quantized.scales.float().repeat_interleave(64, dim=0)[:200]
    error = (quantized.dequantize() - matrix).abs()
    assert bool((error <= scale / 2 + 1e-6 * matrix.abs().amax(dim=0)).all())
    assert float(error[:, 4].max()) == 0.0


def test_eight_bit_quantization_is_within_one_percent():
    matrix = torch.randn(512, 16, generator=torch.Generator().manual_seed(2))
    quantized = quantize(matrix, 8)
    assert float((quantized.dequantize() - matrix).norm() / matrix.norm()) < 0.01


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_quantized_nbytes_are_exactly_the_stored_bytes(bits):
    quantized = quantize(columns_of_mixed_scale(), bits, group_size=64)
    stored = tensor_bytes(quantized.to_tensors("m"))
    assert quantized.nbytes == stored == quantized_nbytes(200, 12, bits, 64)
    assert quantized.packed.numel() == math.ceil(200 * 12 * bits / 8)


def test_resolve_scheme_cuts_and_fills():
    assert resolve_scheme(DEFAULT_SCHEME, 20) == ((8, 2), (4, 6), (2, 12))
    assert resolve_scheme(DEFAULT_SCHEME, 5) == ((8, 2), (4, 3))
    assert resolve_scheme([(4, 3), (2, 3)], 6) == ((4, 3), (2, 3))
    with pytest.raises(HfGraftError, match="covers 6 of 8 columns"):
        resolve_scheme([(4, 3), (2, 3)], 8)
    with pytest.raises(HfGraftError, match="only the last block"):
        resolve_scheme([(8, None), (2, 3)], 8)
    with pytest.raises(HfGraftError, match="bits must be an int from 1 to 8"):
        resolve_scheme([(16, None)], 8)


def test_mixed_precision_factor_is_smaller_than_eight_bits_and_matches_its_blocks():
    factor = torch.randn(512, 32, generator=torch.Generator().manual_seed(3)) * torch.logspace(0, -2, 32)
    mixed = quantize_factor(factor, DEFAULT_SCHEME)
    uniform = quantize_factor(factor, [(8, None)])
    assert mixed.scheme == ((8, 2), (4, 6), (2, 24))
    assert mixed.nbytes < uniform.nbytes
    assert mixed.nbytes == tensor_bytes(mixed.to_tensors("f"))
    # Quantization is per column: a block quantized alone gives the same columns.
    assert torch.equal(mixed.dequantize()[:, 2:8], quantize(factor[:, 2:8], 4).dequantize())
    error = {
        name: float((quantized.dequantize() - factor).norm())
        for name, quantized in {"8": uniform, "8/4/2": mixed, "2": quantize_factor(factor, [(2, None)])}.items()
    }
    assert error["8"] < error["8/4/2"] < error["2"]


def test_quantized_tensors_round_trip_and_are_validated():
    factor = quantize_factor(torch.randn(100, 10), [(8, 1), (3, None)], group_size=32)
    tensors = factor.to_tensors("lin.B")
    assert sorted(tensors) == [f"lin.B.{i}.{part}" for i in (0, 1) for part in ("packed", "scales", "zeros")]
    meta = json.loads(json.dumps(factor.meta))
    again = MixedPrecisionFactor.from_tensors("lin.B", tensors, meta)
    assert torch.equal(again.dequantize(), factor.dequantize())

    with pytest.raises(HfGraftError, match=r"'lin.B.1.scales' has shape \(4, 8\) where \(4, 9\) expected"):
        MixedPrecisionFactor.from_tensors("lin.B", {**tensors, "lin.B.1.scales": torch.zeros(4, 8).half()}, meta)
    with pytest.raises(HfGraftError, match="'lin.B.0.zeros' has dtype torch.float32"):
        MixedPrecisionFactor.from_tensors("lin.B", {**tensors, "lin.B.0.zeros": torch.zeros(4, 1)}, meta)
    with pytest.raises(HfGraftError, match="'lin.B.1.packed' has shape"):  # 3-bit codes read as 4-bit
        MixedPrecisionFactor.from_tensors("lin.B", tensors, {**meta, "scheme": [[8, 1], [4, 9]]})
    with pytest.raises(HfGraftError, match="'lin.B.0.packed' is missing"):
        MixedPrecisionFactor.from_tensors("lin.B", {k: v for k, v in tensors.items() if "0.packed" not in k}, meta)
    with pytest.raises(HfGraftError, match="covers 9 of 10 columns"):
        MixedPrecisionFactor.from_tensors("lin.B", tensors, {**meta, "scheme": [[8, 1], [3, 8]]})
    with pytest.raises(HfGraftError, match="covering exactly 10 columns"):
        MixedPrecisionFactor.from_tensors("lin.B", tensors, {**meta, "scheme": [[8, 1], [3, 10]]})
    with pytest.raises(HfGraftError, match="must have the keys"):
        QuantizedMatrix.from_tensors("lin.B.0", tensors, {"bits": 8, "shape": [100, 1]})


def test_quantize_rejects_bad_input():
    with pytest.raises(HfGraftError, match="non-empty 2-D floating-point"):
        quantize(torch.randn(5), 4)
    with pytest.raises(HfGraftError, match="NaN or infinite"):
        quantize(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(HfGraftError, match="float16 range"):
        quantize(torch.tensor([[1e6], [-1e6]]), 4)
    with pytest.raises(HfGraftError, match="group_size must be an int >= 1"):
        quantize(torch.randn(4, 4), 4, group_size=0)


# --- low-rank factors ----------------------------------------------------------------------------

DECAY = 0.95 ** torch.arange(128, dtype=torch.float32)


def analytic_rank(singular_values: torch.Tensor, energy: float) -> int:
    shares = np.cumsum(singular_values.double().numpy() ** 2) / float((singular_values.double() ** 2).sum())
    return int(np.searchsorted(shares, energy) + 1)


@pytest.mark.parametrize("method", ["randomized", "full"])
def test_rank_for_energy_matches_the_spectrum(method):
    delta = spectrum_matrix(128, 192, DECAY)
    expected = analytic_rank(DECAY, 0.9)
    assert expected == 23  # sum(0.9025**i, i < r) / sum(0.9025**i) first reaches 0.9 at r = 23
    factors = lowrank_factors(delta, energy=0.9, method=method)
    assert factors.rank == expected
    assert factors.a.shape == (23, 192) and factors.b.shape == (128, 23)
    measured = float((delta - factors.b @ factors.a).norm() / delta.norm())
    assert factors.relative_error == pytest.approx(measured, rel=1e-4)
    # The randomized sketch slightly underestimates the smallest kept singular values.
    assert torch.allclose(factors.singular_values, DECAY[:23], rtol=1e-4 if method == "full" else 1e-2)
    assert rank_for_energy(DECAY, float((DECAY.double() ** 2).sum()), 0.9) == expected


def test_randomized_svd_matches_full_error_and_is_faster():
    delta = spectrum_matrix(512, 1408, 0.98 ** torch.arange(512, dtype=torch.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: a ratio, not a race with other jobs for cores
    try:
        timings = {}
        for method in ("randomized", "full"):
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                factors = lowrank_factors(delta, energy=0.8, method=method)
                runs.append(time.perf_counter() - start)
            timings[method] = (min(runs), factors)
    finally:
        torch.set_num_threads(threads)
    (fast, randomized), (slow, full) = timings["randomized"], timings["full"]
    assert randomized.rank == full.rank
    assert randomized.relative_error == pytest.approx(full.relative_error, rel=0.01)
    assert slow >= 3 * fast, f"randomized {fast:.3f}s vs full {slow:.3f}s"


@pytest.mark.parametrize("shape", [(96, 300), (300, 96)])
def test_thin_svd_is_at_least_as_exact_as_float32_lapack(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    u, s, vh = thin_svd(matrix)
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert torch.all(s[:-1] >= s[1:])
    exact = torch.linalg.svdvals(matrix.double())
    lapack = torch.linalg.svdvals(matrix).double()
    assert float((s.double() - exact).abs().max()) <= max(float((lapack - exact).abs().max()), 1e-6)
    assert torch.allclose((u * s) @ vh, matrix, atol=1e-5)
    assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(k), atol=1e-5)


def test_thin_svd_of_a_rank_deficient_and_a_zero_matrix():
    low = torch.randn(40, 3, generator=torch.Generator().manual_seed(4)) @ torch.randn(3, 70, generator=torch.Generator().manual_seed(5))
    u, s, vh = thin_svd(low)
    assert float(s[3:].max()) < 1e-4 * float(s[0])
    assert torch.allclose((u[:, :3] * s[:3]) @ vh[:3], low, atol=1e-4)
    assert torch.isfinite(vh).all() and float(vh.norm(dim=1).max()) <= 1 + 1e-5
    assert all(t.dtype == torch.float32 for t in thin_svd(low.bfloat16()))
    u, s, vh = thin_svd(torch.zeros(5, 8))
    assert torch.equal(s, torch.zeros(5)) and torch.equal(vh, torch.zeros(5, 8)) and u.shape == (5, 5)


def test_randomized_svd_gives_way_to_the_gram_route_for_a_large_share_of_the_rank():
    delta = spectrum_matrix(600, 400, 0.999 ** torch.arange(400, dtype=torch.float32))  # 95% needs most of the rank
    randomized, gram, full = (lowrank_factors(delta, energy=0.95, method=method) for method in ("randomized", "gram", "full"))
    assert full.rank > 0.25 * 400 and randomized.rank == gram.rank == full.rank
    assert torch.equal(randomized.a, gram.a) and torch.equal(randomized.b, gram.b)
    # The float32 Gram route keeps what the exact SVD keeps, to float32 precision.
    assert torch.allclose(gram.singular_values, full.singular_values, rtol=1e-4)
    assert abs(gram.relative_error - full.relative_error) < 1e-4
    error = float(torch.linalg.norm(delta - gram.b @ gram.a)) / float(torch.linalg.norm(delta))
    assert abs(error - full.relative_error) < 1e-4
    low = lowrank_factors(spectrum_matrix(600, 400, 0.5 ** torch.arange(400, dtype=torch.float32)), energy=0.9)
    assert low.rank < 10


def test_lowrank_factors_accepts_bf16_and_honours_rank_bounds():
    delta = spectrum_matrix(64, 96, DECAY[:64])
    factors = lowrank_factors(delta.bfloat16(), energy=0.9)
    assert factors.a.dtype == factors.b.dtype == torch.float32
    assert factors.rank == analytic_rank(DECAY[:64], 0.9)
    assert lowrank_factors(delta, energy=0.9, max_rank=5).rank == 5
    assert lowrank_factors(delta, energy=0.1, min_rank=7).rank == 7
    assert lowrank_factors(delta, energy=1.0, method="randomized").rank == 64
    zero = lowrank_factors(torch.zeros(8, 8))
    assert zero.rank == 1 and zero.relative_error == 0.0


def test_lowrank_factors_rejects_bad_input():
    with pytest.raises(HfGraftError, match="2-D floating-point"):
        lowrank_factors(torch.randn(8))
    with pytest.raises(HfGraftError, match=r"energy must be a number in \(0, 1\]"):
        lowrank_factors(torch.randn(8, 8), energy=1.5)
    with pytest.raises(HfGraftError, match=r"min_rank \(at most min\(8, 4\)\)"):
        lowrank_factors(torch.randn(8, 4), min_rank=5)
    with pytest.raises(HfGraftError, match="max_rank"):
        lowrank_factors(torch.randn(8, 8), min_rank=3, max_rank=2)
    with pytest.raises(HfGraftError, match="method must be"):
        lowrank_factors(torch.randn(8, 8), method="qr")
    with pytest.raises(HfGraftError, match="NaN or infinite"):
        lowrank_factors(torch.full((4, 4), float("inf")))


# --- pruning -------------------------------------------------------------------------------------


def distinct_magnitudes(rows: int, cols: int) -> torch.Tensor:
    """A matrix whose entries have pairwise different magnitudes, so the top-k set is unique."""
    generator = torch.Generator().manual_seed(4)
    magnitudes = (torch.randperm(rows * cols, generator=generator).float() + 1) / (rows * cols)
    signs = torch.randint(0, 2, (rows * cols,), generator=generator) * 2 - 1
    return (magnitudes * signs).reshape(rows, cols)


@pytest.mark.parametrize(("keep_fraction", "expected_format"), [(0.01, "indices"), (0.05, "bitmap")])
def test_prune_keeps_exactly_the_largest_entries(keep_fraction, expected_format):
    delta = distinct_magnitudes(100, 100)
    sparse = prune(delta, keep_fraction)
    count = round(keep_fraction * 10_000)
    assert sparse.format == expected_format and sparse.values.numel() == count
    threshold = delta.abs().flatten().topk(count).values[-1]
    expected = torch.where(delta.abs() >= threshold, delta.half().float(), torch.zeros(()))
    assert torch.equal(sparse.to_dense(), expected)
    assert sparse.nbytes == tensor_bytes(sparse.to_tensors("e")) == sparse_nbytes(10_000, count)


def test_sparse_format_is_the_smaller_encoding():
    # 10,000 entries: the bitmap takes 1,250 bytes, indices 4 bytes per kept entry.
    assert sparse_format(10_000, 312) == "indices" and sparse_nbytes(10_000, 312) == 2 * 312 + 4 * 312
    assert sparse_format(10_000, 313) == "bitmap" and sparse_nbytes(10_000, 313) == 2 * 313 + 1250
    assert sparse_format(2**31 + 8, 1) == "bitmap"  # beyond int32 indices


@pytest.mark.parametrize("keep_fraction", [0.01, 0.05])
def test_sparse_round_trip_and_validation(keep_fraction):
    sparse = prune(distinct_magnitudes(100, 100), keep_fraction)
    tensors, meta = sparse.to_tensors("emb"), json.loads(json.dumps(sparse.meta))
    assert torch.equal(SparseDelta.from_tensors("emb", tensors, meta).to_dense(), sparse.to_dense())
    with pytest.raises(HfGraftError, match="'emb.values' has shape"):
        SparseDelta.from_tensors("emb", tensors, {**meta, "count": meta["count"] - 1})
    if sparse.format == "indices":
        bad = tensors["emb.indices"].clone()
        bad[-1] = 10_000
        with pytest.raises(HfGraftError, match=r"outside \[0, 10000\)"):
            SparseDelta.from_tensors("emb", {**tensors, "emb.indices": bad}, meta)
        bad = tensors["emb.indices"].flip(0)
        with pytest.raises(HfGraftError, match="not strictly increasing"):
            SparseDelta.from_tensors("emb", {**tensors, "emb.indices": bad}, meta)
    else:
        bad = tensors["emb.bitmap"].clone()
        bad[0] ^= 1
        with pytest.raises(HfGraftError, match="where 500 values are stored"):
            SparseDelta.from_tensors("emb", {**tensors, "emb.bitmap": bad}, meta)
    with pytest.raises(HfGraftError, match="'indices' or 'bitmap'"):
        SparseDelta.from_tensors("emb", tensors, {**meta, "format": "csr"})


def test_prune_rejects_bad_input():
    with pytest.raises(HfGraftError, match=r"keep_fraction must be a number in \(0, 1\]"):
        prune(torch.randn(4, 4), 0.0)
    with pytest.raises(HfGraftError, match="float16 range"):
        prune(torch.tensor([1e6, 1.0]), 0.5)


# --- compress_delta and storage ------------------------------------------------------------------

SPECS = {
    "lowrank": {"kind": "lowrank", "rank": 12},
    "quant": {"kind": "quant", "bits": 2},
    "quant_residual": {"kind": "quant", "bits": 1, "group_size": 96, "rank": 4},
    "sparse_indices": {"kind": "sparse", "keep_fraction": 0.01},
    "sparse_bitmap": {"kind": "sparse", "keep_fraction": 0.2},
    "dense": {"kind": "dense_fp16"},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_compressed_delta_round_trips_bit_exactly_through_safetensors(tmp_path, name):
    delta = spectrum_matrix(96, 160, DECAY[:96]) if name != "dense" else torch.randn(160)
    compressed = compress_delta(delta, SPECS[name])
    tensors = compressed.to_tensors(f"layers.0.{name}")
    assert compressed.nbytes == tensor_bytes(tensors)
    save_tensors(tensors, tmp_path / "pack.safetensors", metadata={"meta": json.dumps(compressed.meta)})
    loaded, metadata = load_tensors(tmp_path / "pack.safetensors")
    again = CompressedDelta.from_tensors(f"layers.0.{name}", loaded, json.loads(metadata["meta"]))
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(raw(loaded[key]), raw(tensor))
    assert torch.equal(again.delta(), compressed.delta())


def test_lowrank_delta_applies_without_rebuilding_the_weight():
    delta = spectrum_matrix(96, 160, DECAY[:96])
    compressed = compress_delta(delta, {"kind": "lowrank", "rank": 30, "scheme": [[8, None]], "group_size": 32})
    a, b = compressed.lowrank()
    assert a.shape == (30, 160) and b.shape == (96, 30)
    x = torch.randn(5, 160)
    assert torch.allclose(x @ a.T @ b.T, x @ compressed.delta().T, atol=1e-5)
    truncation = lowrank_factors(delta, energy=1.0, min_rank=30, max_rank=30).relative_error
    assert truncation < compressed.relative_error(delta) < truncation + 0.01
    bf16_bytes = 2 * delta.numel()
    assert compressed.nbytes < bf16_bytes / 2


def test_specs_are_validated():
    assert normalize_spec({"kind": "lowrank", "rank": 12}, (96, 160)) == {
        "kind": "lowrank", "rank": 12, "scheme": [[8, 2], [4, 6], [2, 4]], "group_size": 128,
    }
    with pytest.raises(HfGraftError, match="'kind' set to one of"):
        normalize_spec({"kind": "svd"}, (4, 4))
    with pytest.raises(HfGraftError, match=r"takes the keys \['keep_fraction', 'kind'\], got"):
        normalize_spec({"kind": "sparse", "keep_fraction": 0.1, "rank": 2}, (4, 4))
    with pytest.raises(HfGraftError, match=r"rank \(at most min\(4, 6\)\) must be an int from 1 to 4"):
        normalize_spec({"kind": "lowrank", "rank": 5}, (4, 6))
    with pytest.raises(HfGraftError, match="needs a 2-D delta"):
        normalize_spec({"kind": "lowrank", "rank": 1}, (4,))
    with pytest.raises(HfGraftError, match="lowrank\\(\\) needs a 'lowrank' delta"):
        compress_delta(torch.randn(4), {"kind": "dense_fp16"}).lowrank()
    with pytest.raises(HfGraftError, match="Metadata 'rank'"):
        compressed = compress_delta(torch.randn(8, 8), {"kind": "lowrank", "rank": 2})
        CompressedDelta.from_tensors("x", compressed.to_tensors("x"), {**compressed.meta, "rank": 9})


def anisotropic_statistics(rows: int, cols: int, seed: int = 0) -> ModuleStatistics:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5
    inputs = (torch.randn(1024, cols, generator=generator) * torch.logspace(-1, 1, cols)) @ mixing  # correlated
    return ModuleStatistics(inputs.T @ inputs / 1024, torch.rand(rows, generator=generator) + 0.1)


@pytest.mark.parametrize("search, tolerance", [("exhaustive", 1e-4), ("predicted", 0.3)])
def test_measured_candidates_are_what_the_pack_stores(search, tolerance):
    """Direct-quantization candidates are measured by compressing them (exhaustive) or predicted from
    GPTQ's error accounting; low-rank ones by rounding the factors, which GPTQ then only improves.
    Bytes are payload plus header and metadata, exactly, either way."""
    delta = spectrum_matrix(96, 160, DECAY[:96])
    statistics = anisotropic_statistics(96, 160)
    candidates = measure_candidates("layers.0.proj.weight", delta, statistics, ladder=CandidateLadder(search=search))
    kinds = {candidate.spec["kind"] for candidate in candidates}
    assert kinds == {"omit", "quant", "lowrank"} and len(candidates) > 15
    for candidate in candidates:
        if candidate.spec == OMIT:
            assert candidate.nbytes == 0  # an omitted delta stores nothing; the card lists it
            assert candidate.cost == pytest.approx(statistics.cost(delta))
            continue
        compressed = compress_with_statistics(delta, candidate.spec, statistics)
        assert candidate.nbytes == compressed.nbytes + ENTRY_BYTES == payload_size(segment_layout(compressed.meta)) + ENTRY_BYTES
        actual = statistics.cost(delta - compressed.delta())
        if candidate.spec["kind"] == "quant":
            assert candidate.cost == pytest.approx(actual, rel=tolerance)
        else:
            assert actual <= candidate.cost * 1.05
    sparse = measure_candidates("embed.weight", delta, None, sparse=True, ladder=CandidateLadder(search=search))
    for candidate in (c for c in sparse if c.spec["kind"] == "sparse"):
        compressed = compress_delta(delta, candidate.spec)
        assert candidate.cost == pytest.approx(float((delta - compressed.delta()).double().square().sum()), rel=max(tolerance, 0.01))


def test_output_objective_beats_weight_error_where_it_counts():
    """With anisotropic inputs, measuring and compressing by output cost leaves less output cost
    than choosing by Frobenius error at the same bytes."""
    delta = spectrum_matrix(96, 160, torch.ones(96) / 10)
    statistics = anisotropic_statistics(96, 160)
    for bits in (2, 3):
        spec = {"kind": "quant", "bits": bits}
        calibrated = compress_with_statistics(delta, spec, statistics)
        plain = compress_delta(delta, spec)
        assert calibrated.nbytes == plain.nbytes
        assert statistics.cost(delta - calibrated.delta()) < 0.9 * statistics.cost(delta - plain.delta())


# --- allocation ----------------------------------------------------------------------------------


def two_spectra() -> dict[str, torch.Tensor]:
    """Two deltas of equal shape and equal norm: one with a steep spectrum, one with a flat one."""
    steep = 0.7 ** torch.arange(96, dtype=torch.float32)
    flat = torch.ones(96)
    return {
        "steep": spectrum_matrix(96, 160, steep / steep.norm(), seed=5),
        "flat": spectrum_matrix(96, 160, flat / flat.norm(), seed=6),
    }


def model_deltas() -> dict[str, torch.Tensor]:
    return {
        **two_spectra(),
        "embed": distinct_magnitudes(300, 64) * 1e-2,
        "norm": torch.randn(96) * 1e-3,
    }


def test_allocate_fits_the_budget():
    deltas = model_deltas()
    specs = allocate(deltas, target_ratio=8, sparse={"embed"}, progress=False)
    assert specs["norm"]["kind"] == "dense_fp16" and specs["steep"]["kind"] == "lowrank"
    budget = sum(2 * d.numel() for d in deltas.values()) // 8
    stored = sum(
        compress_delta(deltas[name], spec).nbytes + ENTRY_BYTES
        for name, spec in specs.items() if spec != OMIT
    )
    assert stored <= budget


def test_total_cost_grows_with_the_compression_ratio():
    deltas = model_deltas()
    measured = {
        name: measure_candidates(f"{name}.weight", delta, None, sparse=name == "embed") for name, delta in deltas.items()
    }
    bf16 = sum(2 * d.numel() for d in deltas.values())
    costs = []
    for ratio in (2, 4, 8, 16, 24, 48):
        chosen = select(measured, bf16 // ratio)
        assert sum(c.nbytes for c in chosen.values()) <= bf16 // ratio
        costs.append(sum(c.cost for c in chosen.values()))
    assert costs == sorted(costs) and costs[0] < costs[-1]


def test_steep_spectrum_gets_fewer_bytes():
    """Equal norms: the steep delta's first few directions hold nearly all its energy, so once it
    has them a byte removes far more error in the flat delta, and the flat one must get more bytes.
    The allocation must also beat every uniform one (the same spec for both), which it could have
    chosen: the allocator is exact up to a rounding of sizes far below the 1% margin left here."""
    deltas = two_spectra()
    measured = {name: measure_candidates(f"{name}.weight", delta, None) for name, delta in deltas.items()}
    bf16 = sum(2 * d.numel() for d in deltas.values())
    for ratio in (4, 8, 16):
        chosen = select(measured, bf16 // ratio)
        assert chosen["steep"].nbytes < chosen["flat"].nbytes
        flat = {json.dumps(c.spec): c for c in measured["flat"]}
        uniform = [
            steep.cost + flat[key].cost
            for steep in measured["steep"]
            if (key := json.dumps(steep.spec)) in flat and steep.nbytes + flat[key].nbytes <= 0.99 * bf16 // ratio
        ]
        assert uniform and sum(c.cost for c in chosen.values()) <= min(uniform)


def test_allocate_rejects_bad_requests():
    deltas = two_spectra()
    with pytest.raises(HfGraftError, match="exactly one of target_ratio and byte_budget"):
        allocate(deltas, progress=False)
    with pytest.raises(HfGraftError, match="exactly one of target_ratio and byte_budget"):
        allocate(deltas, target_ratio=4, byte_budget=1000, progress=False)
    with pytest.raises(HfGraftError, match="not among the deltas"):
        allocate(deltas, target_ratio=4, sparse={"lm_head"}, progress=False)
    with pytest.raises(HfGraftError, match="CandidateLadder fraction must be a number in \\(0, 1\\]"):
        CandidateLadder(keep_fractions=(0.1, 2.0))
    with pytest.raises(HfGraftError, match="needs quantization widths or low-rank energies"):
        CandidateLadder(quant_bits=(), energies=())


# Calibrated compression (GPTQ-style)

from hf_graft.skillpack.compression.calibrate import _ColumnQuantizer, compress_delta_calibrated, gptq  # noqa: E402


def test_gptq_with_an_identity_hessian_is_plain_rounding():
    matrix = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    quantizer = _ColumnQuantizer(torch.tensor([8, 8, 4, 4, 2, 2]), 128, 300, span=2)
    result = gptq(matrix, torch.eye(6), quantizer, damping=0.0)
    for start, bits in ((0, 8), (2, 4), (4, 2)):
        plain = quantize(matrix[:, start : start + 2], bits, 128, clip=True)
        assert torch.equal(result[:, start : start + 2], plain.dequantize())


def test_gptq_leaves_its_input_alone_even_a_transposed_view():
    """GPTQ works on columns laid out contiguously: a transposed view of a contiguous matrix must still be copied."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 16, generator=generator) * torch.logspace(-1, 1, 16)
    stored = torch.randn(16, 40, generator=generator)  # a Conv1D delta, [in, out]: GPTQ sees its transpose
    kept = stored.clone()
    result = gptq(stored.T, inputs.T @ inputs / 256, _ColumnQuantizer(torch.full((16,), 2), 40, 40, span=8))
    assert torch.equal(stored, kept) and result.shape == (40, 16)
    assert float((result - stored.T).abs().max()) > 0  # 2-bit codes: it did quantize


def test_calibration_lowers_the_output_error_on_anisotropic_inputs():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(192, 24, generator=generator) @ torch.randn(24, 256, generator=generator) / 24
    inputs = torch.randn(2048, 256, generator=generator) * torch.logspace(-1.5, 1.5, 256)
    hessian = inputs.T @ inputs / len(inputs)
    spec = {"kind": "lowrank", "rank": 16}

    def output_error(compressed):
        error = delta - compressed.delta()
        return float(torch.trace(error @ hessian @ error.T) / torch.trace(delta @ hessian @ delta.T)) ** 0.5

    plain = compress_delta(delta, spec)
    calibrated = compress_delta_calibrated(delta, spec, hessian)
    assert calibrated.nbytes == plain.nbytes and calibrated.meta == plain.meta
    assert output_error(calibrated) < 0.8 * output_error(plain)  # measured: 0.41 vs 0.58
    transposed = compress_delta_calibrated(delta.T.contiguous(), spec, hessian, fan_in_fan_out=True)
    assert torch.allclose(transposed.delta(), calibrated.delta().T, atol=1e-6)
    with pytest.raises(HfGraftError, match=r"needs a \[256, 256\] Hessian"):
        compress_delta_calibrated(delta, spec, torch.eye(192))


def test_delta_spectrum_shares_of_energy():
    """A rank-1 matrix holds all its energy in its first singular value; a scaled identity spreads
    it evenly, so its top 10% of 100 directions hold exactly 10%. Energies of matrices add up."""
    from hf_graft.skillpack import delta_spectrum

    rank_one = {"a": {"weight": torch.outer(torch.arange(1.0, 101.0), torch.ones(60)), "bias": torch.ones(100)}}
    assert delta_spectrum(rank_one)["energy_top1pct"] == pytest.approx(1.0, abs=1e-9)
    even = {"b": {"weight": 2 * torch.eye(100)}}
    assert delta_spectrum(even) == pytest.approx({"energy_top1pct": 0.01, "energy_top10pct": 0.10}, abs=1e-9)
    both = delta_spectrum({"b": {"weight": torch.eye(100)}, "c": {"weight": torch.diag(torch.tensor([10.0] + [0.0] * 99))}})
    assert both["energy_top1pct"] == pytest.approx((1 + 100) / (100 + 100), abs=1e-9)
    with pytest.raises(HfGraftError, match="non-zero 2-D delta"):
        delta_spectrum({"norm": {"weight": torch.ones(4)}})
