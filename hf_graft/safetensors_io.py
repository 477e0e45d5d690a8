"""Safe reading and atomic writing of safetensors files (and the JSON/text files beside them).

Every file hf-graft loads goes through :func:`read_header` first: the header is parsed and checked
by hand (sizes, dtypes, shapes, offsets, coverage of the data buffer) before any tensor is
created, so a truncated download or a tampered file fails with one :class:`HfGraftError` that
names the file, the problem and the fix, rather than a low-level error from deep inside a load.
Every file hf-graft writes goes to a temporary file in the same directory, is fsynced and renamed
over the target, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import HfGraftError, short_repr
from .validation import is_int

__all__ = [
    "DTYPE_NAMES",
    "ITEMSIZES",
    "MAX_HEADER_BYTES",
    "TORCH_DTYPES",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_directory",
    "load_tensors",
    "read_json",
    "in_safetensors_order",
    "read_checked_header",
    "read_header",
    "safetensors_header",
    "save_tensors",
]

MAX_HEADER_BYTES = 100_000_000
"""The largest header safetensors itself accepts; a larger length field means a corrupt file."""

# safetensors dtype name -> torch dtype name, for every byte-aligned dtype safetensors defines.
# Dtypes the installed torch lacks are left out, so a file using them fails with a clear message.
_TORCH_ATTRS = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _TORCH_ATTRS.items() if hasattr(torch, attr)
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
ITEMSIZES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}

#: safetensors writes a file's tensors by dtype, in the reverse order of its ``Dtype`` enum (widest
#: first), then by name.
_WRITE_RANK = {
    name: rank
    for rank, name in enumerate(
        ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
    )
}

_FIX = "Re-download or re-save it."


def _corrupt(path: str, problem: str) -> HfGraftError:
    return HfGraftError(f"{path} is not a valid safetensors file: {problem}. {_FIX}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a key given twice makes the header ambiguous, so refuse it."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the JSON header of the safetensors file at ``path``.

    Returns the header as stored: one ``{"dtype", "shape", "data_offsets"}`` entry per tensor name,
    plus ``"__metadata__"`` (a dict of str to str) when the file has one. Nothing beyond the header
    is read. Raises :class:`HfGraftError` if the file is truncated, the header is not a UTF-8 JSON
    object, a dtype is unknown, a shape is not a list of non-negative integers, a tensor's byte
    span does not match its shape and dtype, tensors overlap, or bytes of the data buffer belong
    to no tensor (the rules safetensors enforces, checked before it maps anything), or a name
    appears twice (which JSON parsers would silently collapse).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"truncated: {file_size} bytes, less than the 8-byte header length")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size == 0:
                raise _corrupt(path, "corrupt header: its length is 0")
            if header_size > MAX_HEADER_BYTES:
                raise _corrupt(path, f"corrupt header: length {header_size} exceeds {MAX_HEADER_BYTES} bytes")
            if header_size > file_size - 8:
                raise _corrupt(
                    path, f"truncated: the header needs {header_size} bytes, only {file_size - 8} follow"
                )
            raw = f.read(header_size)
    except OSError as e:
        raise HfGraftError(f"Cannot read {path}: {e.strerror or e}. Check the path and permissions.") from e
    if len(raw) < header_size:
        raise _corrupt(path, "truncated: the file shrank while it was read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise _corrupt(path, f"corrupt header: not UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, f"corrupt header: a JSON {type(header).__name__} where an object expected")
    _check_entries(path, header, file_size - 8 - header_size)
    return header


def _check_entries(path: str, header: dict[str, Any], buffer_size: int) -> None:
    """Check the metadata and every tensor entry of a parsed header against the data buffer."""
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(path, "corrupt header: __metadata__ is not a mapping of strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensor = f"tensor {short_repr(name)}"
        if not isinstance(info, dict):
            raise _corrupt(path, f"corrupt header: the entry of {tensor} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in ITEMSIZES):
            raise _corrupt(
                path, f"{tensor} has dtype {short_repr(dtype)} where one of {', '.join(ITEMSIZES)} expected"
            )
        if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
            raise _corrupt(
                path, f"{tensor} has shape {short_repr(shape)} where a list of non-negative ints expected"
            )
        if math.prod(max(d, 1) for d in shape) * ITEMSIZES[dtype] >= 2**63:
            raise _corrupt(path, f"{tensor} has shape {short_repr(shape)} too large for any tensor")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(
                path,
                f"{tensor} has data_offsets {short_repr(offsets)} where [begin, end] with begin <= end expected",
            )
        begin, end = offsets
        needed = math.prod(shape) * ITEMSIZES[dtype]
        if end - begin != needed:
            raise _corrupt(
                path,
                f"{tensor} spans {end - begin} bytes where shape {short_repr(shape)} of {dtype} needs {needed}",
            )
        if end > buffer_size:
            raise _corrupt(
                path, f"truncated: {tensor} ends at data byte {end}, the data holds {buffer_size}"
            )
        spans.append((begin, end, tensor))
    position, previous = 0, None
    for begin, end, tensor in sorted(spans):
        if begin < position:
            raise _corrupt(path, f"{previous} and {tensor} overlap")
        if begin > position:
            raise _corrupt(path, f"data bytes {position}..{begin} belong to no tensor")
        position, previous = end, tensor
    if position != buffer_size:
        raise _corrupt(path, f"data bytes {position}..{buffer_size} belong to no tensor")


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(map(repr, names[:5])) + more


def _check_expected(
    path: str,
    header: dict[str, Any],
    expected: Mapping[str, tuple[Sequence[int], torch.dtype]],
    allow_extra: bool,
) -> None:
    """Compare a validated header with the tensor names, shapes and dtypes a caller needs."""
    present = {name: info for name, info in header.items() if name != "__metadata__"}
    missing = sorted(set(expected) - set(present))
    if missing:
        raise HfGraftError(
            f"{path} lacks expected tensor(s) {_listing(missing)}. It was saved from a different model or "
            "is incomplete; load it into the model it was saved from, or re-save it."
        )
    extra = sorted(set(present) - set(expected))
    if extra and not allow_extra:
        raise HfGraftError(
            f"{path} holds unexpected tensor(s) {_listing(extra)}. It was saved from a different model; "
            "load it into the model it was saved from (or pass allow_extra=True to skip them)."
        )
    for name, (shape, dtype) in expected.items():
        stored_shape, wanted_shape = tuple(present[name]["shape"]), tuple(int(d) for d in shape)
        if stored_shape != wanted_shape:
            raise HfGraftError(
                f"{path}: tensor {name!r} has shape {stored_shape} where {wanted_shape} expected. It was "
                "saved from a model with a different configuration; build the model from the same config."
            )
        stored_dtype, wanted_dtype = present[name]["dtype"], DTYPE_NAMES.get(dtype, str(dtype))
        if stored_dtype != wanted_dtype:
            raise HfGraftError(
                f"{path}: tensor {name!r} has dtype {stored_dtype} where {wanted_dtype} expected. Build the "
                "model in the dtype the file was saved in, or re-save the file in this dtype."
            )


def read_checked_header(
    path: str | os.PathLike,
    expected: Mapping[str, tuple[Sequence[int], torch.dtype]] | None = None,
    *,
    allow_extra: bool = False,
) -> dict[str, Any]:
    """:func:`read_header`, then (when ``expected`` is given) the tensors compared with ``expected``:
    a missing tensor, an unexpected one (unless ``allow_extra``), a wrong shape or dtype raises
    :class:`HfGraftError`. Nothing beyond the header is read."""
    path = os.fspath(path)
    header = read_header(path)
    if expected is not None:
        _check_expected(path, header, expected, allow_extra)
    return header


def load_tensors(
    path: str | os.PathLike,
    expected: Mapping[str, tuple[Sequence[int], torch.dtype]] | None = None,
    *,
    allow_extra: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file on CPU, with its metadata, after validating it.

    ``expected`` maps tensor names to ``(shape, dtype)``; when given, a missing tensor, an
    unexpected one (unless ``allow_extra``, which skips them), a wrong shape or a wrong dtype
    raises :class:`HfGraftError` before anything is loaded. Returns ``(tensors, metadata)``, the
    metadata being ``{}`` when the file has none.
    """
    path = os.fspath(path)
    header = read_checked_header(path, expected, allow_extra=allow_extra)
    names = [n for n in header if n != "__metadata__" and (expected is None or n in expected)]
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, str(e)) from e
    return tensors, metadata


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (and optional str-to-str ``metadata``) to ``path`` as safetensors, atomically.

    Tensors are moved to CPU and made contiguous; tensors that share memory (tied weights) are
    stored as separate copies, since safetensors refuses aliased storage. The file is written
    beside ``path``, fsynced and renamed over it, so ``path`` holds either the old file or the
    complete new one.
    """
    bad = [name for name, t in tensors.items() if not (isinstance(name, str) and isinstance(t, torch.Tensor))]
    if bad:
        raise HfGraftError(
            f"Cannot save {os.fspath(path)}: entries {bad[:5]} are not str -> torch.Tensor. "
            "Pass tensors only."
        )
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HfGraftError(
            f"Cannot save {os.fspath(path)}: safetensors metadata must map str to str. "
            "Convert the values with str() or json.dumps()."
        )
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    with atomic_path(path) as tmp:
        save_file(prepared, tmp, metadata=dict(metadata) if metadata is not None else None)


def _reject_constant(name: str):
    raise ValueError(f"JSON constant {name} is not allowed")


def parse_json(text: str | bytes) -> Any:
    """The JSON value of ``text``, parsed strictly (no NaN or Infinity, no duplicate keys); raises ``ValueError``."""
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys)


def read_json(path: str | os.PathLike, fix: str, max_bytes: int = 64 << 20) -> Any:
    """The JSON value in the file at ``path``, parsed strictly (no NaN or Infinity, no duplicate keys).

    A missing, oversized, non-UTF-8 or malformed file raises :class:`HfGraftError` naming the file,
    followed by ``fix``.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) > max_bytes:
            raise HfGraftError(f"{path} is larger than {max_bytes >> 20} MiB: not a file hf-graft wrote. {fix}")
        with open(path, encoding="utf-8") as handle:
            return parse_json(handle.read())
    except FileNotFoundError:
        raise HfGraftError(f"{path} does not exist. {fix}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise HfGraftError(f"{path} is not valid JSON ({error}): the file is truncated or corrupt. {fix}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically; it is serialised before anything is written."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def safetensors_header(layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes before the data of a safetensors file holding ``layout`` ((name, dtype, shape) in
    file order) and ``metadata``: the 8-byte length, then the JSON header padded with spaces to 8 bytes."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def in_safetensors_order(layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``layout`` in the order ``safetensors.torch.save`` writes its tensors, so a file written
    tensor by tensor in this order is byte for byte the one it writes."""
    layout = list(layout)
    unknown = sorted({DTYPE_NAMES[dtype] for _, dtype, _ in layout} - set(_WRITE_RANK))
    if unknown:
        raise HfGraftError(f"Tensors of dtype {unknown} cannot be written tensor by tensor; save them with save_tensors.")
    return sorted(layout, key=lambda entry: (_WRITE_RANK[DTYPE_NAMES[entry[1]]], entry[0]))


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries to disk so that a rename into it survives a crash.

    Platforms that cannot open a directory (Windows) persist renames without it; there it is a no-op.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left untouched.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    # O_EXCL claims the name; mode 0o666 lets the umask set the permissions open() would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield tmp
        # Writers that replace the file rather than fill it (safetensors does) leave it 0600.
        os.chmod(tmp, mode)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)
