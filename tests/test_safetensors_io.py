"""Validated safetensors loading and atomic writing: round trips, every corruption, and a fuzz test."""

import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import save as serialize

import hf_graft.safetensors_io as safetensors_io
from fuzzing import byte_mutations, json_values, mutate
from hf_graft.errors import HfGraftError
from hf_graft.safetensors_io import (
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_header,
    save_tensors,
)

SMALL = {
    "weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "bias": torch.tensor([1, -2], dtype=torch.int16),
    "flag": torch.tensor(True),
}
SMALL_BYTES = serialize(SMALL, metadata={"format": "pt"})
SMALL_HEADER_END = 8 + struct.unpack("<Q", SMALL_BYTES[:8])[0]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so NaNs and -0.0 compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _file_bytes(header, data: bytes = b"", header_size: int | None = None) -> bytes:
    """A safetensors file built by hand: ``header`` is a JSON-able object or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_size is None else header_size) + raw + data


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_round_trip_is_bit_exact(tmp_path):
    tensors = {
        "f32": torch.tensor([1.5, float("nan"), -0.0, float("inf")]),
        "f64": torch.randn(3, 2, dtype=torch.float64),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.tensor([-(2**62), 2**62]),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 4).t(),
    }
    path = tmp_path / "t.safetensors"
    save_tensors(tensors, path, metadata={"format": "pt", "note": "x"})
    loaded, metadata = load_tensors(path, {k: (v.shape, v.dtype) for k, v in tensors.items()})
    assert metadata == {"format": "pt", "note": "x"}
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name


def test_read_header_returns_entries_and_metadata(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(SMALL_BYTES)
    header = read_header(path)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["weight"]["dtype"] == "F32" and header["weight"]["shape"] == [2, 3]
    assert load_tensors(path)[1] == {"format": "pt"}


def test_tied_tensors_are_saved_as_copies(tmp_path):
    shared = torch.randn(4, 4)
    path = tmp_path / "tied.safetensors"
    save_tensors({"embed": shared, "lm_head": shared, "row": shared[1]}, path)
    loaded, _ = load_tensors(path)
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["lm_head"], shared)
    assert torch.equal(loaded["row"], shared[1])


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_tensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_tensors({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_save_rejects_non_tensors_and_non_string_metadata(tmp_path):
    with pytest.raises(HfGraftError, match="not str -> torch.Tensor"):
        save_tensors({"a": [1.0]}, tmp_path / "t.safetensors")
    with pytest.raises(HfGraftError, match="metadata must map str to str"):
        save_tensors({"a": torch.ones(1)}, tmp_path / "t.safetensors", metadata={"epoch": 3})
    assert not os.listdir(tmp_path)


def test_atomic_text_and_json(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_json(path, {"a": [1, 2], "b": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
    atomic_write_text(tmp_path / "README.md", "# hi\n")
    assert (tmp_path / "README.md").read_text() == "# hi\n"
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json"]


DATA4 = b"\0" * 4  # the data of one F32 element
CORRUPT_FILES = [
    pytest.param(b"\x01\x00\x00", "truncated: 3 bytes", id="short-file"),
    pytest.param(_file_bytes({}, header_size=10_000), "truncated: the header needs 10000 bytes", id="header-past-end"),
    pytest.param(_file_bytes({}, header_size=0), "its length is 0", id="zero-header"),
    pytest.param(_file_bytes(b"{}", header_size=2**40), "exceeds 100000000 bytes", id="huge-header"),
    pytest.param(_file_bytes(b"{not json}"), "corrupt header: not UTF-8 JSON", id="non-json"),
    pytest.param(_file_bytes(b'{"a": "\xff"}'), "corrupt header: not UTF-8 JSON", id="non-utf8"),
    pytest.param(_file_bytes([1, 2]), "a JSON list where an object expected", id="not-object"),
    pytest.param(
        _file_bytes(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": 1}', b"\0"),
        "duplicate key 'a'",
        id="duplicate-key",
    ),
    pytest.param(_file_bytes({"__metadata__": {"epoch": 3}}), "__metadata__ is not a mapping", id="bad-metadata"),
    pytest.param(_file_bytes({"a": [0, 4]}, DATA4), "the entry of tensor 'a' is not an object", id="not-an-entry"),
    pytest.param(_file_bytes({"a": _entry(dtype="F33")}, DATA4), "tensor 'a' has dtype 'F33' where", id="bad-dtype"),
    pytest.param(_file_bytes({"a": _entry(shape=(-1,))}, DATA4), "tensor 'a' has shape [-1]", id="negative-shape"),
    pytest.param(_file_bytes({"a": _entry(shape=(1.0,))}, DATA4), "tensor 'a' has shape [1.0]", id="float-shape"),
    pytest.param(_file_bytes({"a": _entry(shape=(True,))}, DATA4), "tensor 'a' has shape [True]", id="bool-shape"),
    pytest.param(_file_bytes({"a": _entry(shape=(0, 2**62, 2**62))}), "too large for any tensor", id="huge-shape"),
    pytest.param(_file_bytes({"a": _entry(offsets=(4, 0))}, DATA4), "has data_offsets [4, 0]", id="reversed-offsets"),
    pytest.param(_file_bytes({"a": _entry(offsets=(0,))}, DATA4), "has data_offsets [0]", id="one-offset"),
    pytest.param(
        _file_bytes({"a": _entry(shape=(3,), offsets=(0, 8))}, DATA4 * 2),
        "tensor 'a' spans 8 bytes where shape [3] of F32 needs 12",
        id="offsets-mismatch-shape",
    ),
    pytest.param(
        _file_bytes({"a": _entry(shape=(2,), offsets=(0, 8))}, b"\0" * 6),
        "truncated: tensor 'a' ends at data byte 8, the data holds 6",
        id="truncated-data",
    ),
    pytest.param(
        _file_bytes({"a": _entry(shape=(2,), offsets=(0, 8)), "b": _entry(offsets=(4, 8))}, DATA4 * 2),
        "tensor 'a' and tensor 'b' overlap",
        id="overlap",
    ),
    pytest.param(_file_bytes({"a": _entry(offsets=(4, 8))}, DATA4 * 2), "data bytes 0..4 belong to no tensor", id="gap"),
    pytest.param(_file_bytes({"a": _entry()}, b"\0" * 6), "data bytes 4..6 belong to no tensor", id="trailing"),
]


@pytest.mark.parametrize(("content", "message"), CORRUPT_FILES)
def test_corrupt_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    for read in (read_header, load_tensors):
        with pytest.raises(HfGraftError) as info:
            read(path)
        assert message in str(info.value)
        assert str(path) in str(info.value) and "Re-download or re-save it." in str(info.value)


def test_a_truncated_download_is_reported(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(SMALL_BYTES[:-3])
    with pytest.raises(HfGraftError, match="truncated: tensor"):
        load_tensors(path)


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(HfGraftError, match="Cannot read .*nowhere.safetensors.*Check the path"):
        load_tensors(tmp_path / "nowhere.safetensors")


def test_remaining_safetensors_errors_are_wrapped(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    path.write_bytes(SMALL_BYTES)

    def failing_open(*args, **kwargs):
        raise SafetensorError("device error")

    monkeypatch.setattr(safetensors_io, "safe_open", failing_open)
    with pytest.raises(HfGraftError, match="device error. Re-download or re-save it."):
        load_tensors(path)


EXPECTED = {name: (tuple(t.shape), t.dtype) for name, t in SMALL.items()}


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({**EXPECTED, "extra": ((1,), torch.float32)}, "lacks expected tensor(s) 'extra'. It was saved"),
        ({k: v for k, v in EXPECTED.items() if k != "flag"}, "holds unexpected tensor(s) 'flag'. It was saved"),
        ({**EXPECTED, "weight": ((3, 2), torch.float32)}, "tensor 'weight' has shape (2, 3) where (3, 2) expected"),
        ({**EXPECTED, "weight": ((2, 3), torch.float16)}, "tensor 'weight' has dtype F32 where F16 expected"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_mismatch_with_expected_raises(tmp_path, expected, message):
    path = tmp_path / "t.safetensors"
    path.write_bytes(SMALL_BYTES)
    with pytest.raises(HfGraftError) as info:
        load_tensors(path, expected)
    assert message in str(info.value)


def test_allow_extra_skips_unexpected_tensors(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(SMALL_BYTES)
    tensors, _ = load_tensors(path, {"weight": ((2, 3), torch.float32)}, allow_extra=True)
    assert list(tensors) == ["weight"] and torch.equal(tensors["weight"], SMALL["weight"])


# Fuzzing: whatever bytes are on disk, loading returns tensors or raises HfGraftError, nothing else.

_byte_mutations = byte_mutations(SMALL_HEADER_END, len(SMALL_BYTES))
_field_values = st.one_of(
    json_values,
    st.lists(st.integers(-2, 40), max_size=3),
    st.tuples(st.integers(-2, 40), st.integers(-2, 40)).map(list),
)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.safetensors"


def _load_or_clear_error(path) -> None:
    try:
        tensors, _ = load_tensors(path)
    except HfGraftError:
        return
    header = read_header(path)
    for name, tensor in tensors.items():
        assert list(tensor.shape) == header[name]["shape"]


@settings(max_examples=500, deadline=None)
@given(mutations=st.lists(_byte_mutations, min_size=1, max_size=4))
def test_fuzzed_bytes_load_or_raise_hf_graft_error(fuzz_path, mutations):
    data = bytearray(SMALL_BYTES)
    for mutation in mutations:
        data = mutate(data, mutation)
    fuzz_path.write_bytes(bytes(data))
    _load_or_clear_error(fuzz_path)


@settings(max_examples=500, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from([*SMALL, "__metadata__", "new"]),
            st.sampled_from([None, "dtype", "shape", "data_offsets"]),
            _field_values,
        ),
        min_size=1,
        max_size=3,
    ),
    data_change=st.integers(-6, 6),
)
def test_fuzzed_header_fields_load_or_raise_hf_graft_error(fuzz_path, edits, data_change):
    header = json.loads(SMALL_BYTES[8:SMALL_HEADER_END])
    for name, field, value in edits:
        if field is None or not isinstance(header.get(name), dict):
            header[name] = value
        else:
            header[name][field] = value
    data = SMALL_BYTES[SMALL_HEADER_END:]
    data = data[:data_change] if data_change < 0 else data + b"\0" * data_change
    fuzz_path.write_bytes(_file_bytes(header, data))
    _load_or_clear_error(fuzz_path)
