"""transformers checkpoints read and written one tensor at a time, never whole.

A checkpoint is a model folder (or Hub repo) holding ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. :class:`Checkpoint` validates the index and every shard's
header up front, then reads a tensor with plain file reads into a fresh buffer: no memory map
stays open, so reading a 30 GB checkpoint tensor by tensor keeps only the tensor in memory
(mapped pages would count against the process until the map closes).
:func:`write_shard` writes a safetensors file whose header is known before its tensors are made,
each tensor produced, written and dropped in turn. Pickled ``pytorch_model.bin`` files are never
opened.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import HfGraftError
from .references import checked_reference
from .safetensors_io import ITEMSIZES, TORCH_DTYPES, atomic_path, read_header, safetensors_header

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint", "iter_rows", "meta_model", "stored_name", "write_shard"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in its file


class Checkpoint:
    """A safetensors checkpoint (single file or sharded) whose tensors are read one by one.

    ``reference`` is a folder written by ``save_pretrained`` or a Hub repo id (only its JSON and
    safetensors files are downloaded). Every shard header and the index are validated when it is
    opened; a tensor the index names but its shard lacks, a shard outside the folder, or a folder
    holding only pickled weights raises :class:`~hf_graft.errors.HfGraftError`.
    """

    def __init__(self, reference: str | os.PathLike, *, revision: Optional[str] = None, token=None):
        self.reference = os.fspath(reference)
        self.folder = _local_folder(self.reference, revision, token)
        self.index_path = os.path.join(self.folder, INDEX_NAME)
        if os.path.isfile(self.index_path):
            self.shards = _shards_of_index(self.index_path, self.folder)
        elif os.path.isfile(os.path.join(self.folder, SINGLE_NAME)):
            self.index_path, self.shards = None, [SINGLE_NAME]
        else:
            pickled = any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(self.folder))
            why = " (it holds pickled weights, which are never read: re-save the model with safe_serialization)" if pickled else ""
            raise HfGraftError(f"{self.reference} holds no {SINGLE_NAME} or {INDEX_NAME}{why}.")
        self._entries: dict[str, _Entry] = {}
        self.shard_keys: dict[str, list[str]] = {}
        for shard in self.shards:
            path = os.path.join(self.folder, shard)
            header = read_header(path)
            start = 8 + _header_length(path)
            keys = sorted((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
            self.shard_keys[shard] = keys
            for name in keys:
                if name in self._entries:
                    raise HfGraftError(f"{self.reference}: tensor {name!r} is stored in two shards.")
                info = header[name]
                self._entries[name] = _Entry(shard, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0])
        if self.index_path is not None:
            _check_index_matches(self.index_path, self._entries)

    def keys(self) -> list[str]:
        """Every tensor name, shard by shard in file order."""
        return [key for shard in self.shards for key in self.shard_keys[shard]]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return TORCH_DTYPES[self._entry(key).dtype]

    def nbytes(self, key: str) -> int:
        entry = self._entry(key)
        return math.prod(entry.shape) * ITEMSIZES[entry.dtype]

    def read(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The tensor ``key`` (or its ``rows``, a step-1 slice of the first dimension), read from disk."""
        entry = self._entry(key)
        shape, offset = list(entry.shape), entry.offset
        if rows is not None:
            start, stop, step = rows.indices(shape[0] if shape else 0)
            if step != 1 or not shape:
                raise HfGraftError("Checkpoint.read takes a contiguous slice of rows.")
            row_bytes = math.prod(shape[1:]) * ITEMSIZES[entry.dtype]
            offset, shape[0] = offset + start * row_bytes, max(0, stop - start)
        nbytes = math.prod(shape) * ITEMSIZES[entry.dtype]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        path = os.path.join(self.folder, entry.file)
        with open(path, "rb") as handle:
            handle.seek(offset)
            read = handle.readinto(memoryview(buffer.numpy()))
        if read != nbytes:
            raise HfGraftError(f"{path} shrank while it was read: tensor {key!r} is cut short. Re-download or re-save it.")
        return buffer.view(TORCH_DTYPES[entry.dtype]).reshape(shape)

    def file_bytes(self) -> int:
        """Bytes of the checkpoint's safetensors files."""
        return sum(os.path.getsize(os.path.join(self.folder, shard)) for shard in self.shards)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise HfGraftError(f"{self.reference} holds no tensor {key!r}.") from None


def _local_folder(reference: str, revision, token) -> str:
    reference = checked_reference(reference)
    if os.path.isdir(reference):
        return reference
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return snapshot_download(reference, revision=revision, token=token, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except (HfHubHTTPError, OSError) as error:
        raise HfGraftError(f"Could not download {reference!r} from the Hub: {error}") from error


def _header_length(path: str) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def _shards_of_index(path: str, folder: str) -> list[str]:
    """The shard file names an index lists, in first-use order, each checked to lie in ``folder``."""
    if os.path.getsize(path) > MAX_INDEX_BYTES:
        raise HfGraftError(f"{path} is larger than {MAX_INDEX_BYTES >> 20} MiB: not a checkpoint index.")
    weight_map = _weight_map(path)
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
            raise HfGraftError(f"{path} names the shard {shard!r}: shards must be .safetensors files beside the index.")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise HfGraftError(f"{path} lists {shard}, which is not in {folder}: the download is incomplete.")
    return shards


def _weight_map(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise HfGraftError(f"{path} is not a checkpoint index ({error}); re-download or re-save it.") from None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise HfGraftError(f"{path} has no 'weight_map' of tensor names to shard files.")
    return weight_map


def _check_index_matches(path: str, entries: dict[str, _Entry]) -> None:
    for name, shard in _weight_map(path).items():
        entry = entries.get(name)
        if entry is None or entry.file != shard:
            raise HfGraftError(f"{path} places {name!r} in {shard}, which does not hold it; re-download or re-save it.")


def write_shard(
    path: str | os.PathLike,
    layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write a safetensors file of the tensors in ``layout`` (name, dtype, shape), made one at a time.

    The header is written first from ``layout``; then each tensor is ``produce(name)``, checked
    against its entry, written and dropped. ``produce`` runs in one worker thread, in layout
    order, making the next tensor while this one is written (two tensors in memory at most).
    The file appears at ``path`` only once complete.
    """
    layout = list(layout)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle, ThreadPoolExecutor(1, thread_name_prefix="write_shard") as worker:
        handle.write(safetensors_header(layout, metadata))
        upcoming = worker.submit(produce, layout[0][0]) if layout else None
        for position, (name, dtype, shape) in enumerate(layout):
            tensor = upcoming.result()
            upcoming = worker.submit(produce, layout[position + 1][0]) if position + 1 < len(layout) else None
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                if upcoming is not None:
                    upcoming.cancel()
                raise HfGraftError(f"write_shard: {name} came out {tensor.dtype} {tuple(tensor.shape)}, its header says {dtype} {tuple(shape)}.")
            handle.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor


def meta_model(folder: str):
    """The model of ``folder``'s config with its parameters on the meta device: its modules and
    buffers (rotary frequencies, masks), no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # the meta parameters are new objects: tie them again, outside the patch
        return model
    except (OSError, ValueError, KeyError) as error:
        raise HfGraftError(f"Cannot build the model of {folder}'s config.json for its structure: {error}") from None


def stored_name(key: str, checkpoint: Checkpoint, prefix: str) -> Optional[str]:
    """``key``'s tensor name in the checkpoint: as is, or with the base model prefix dropped or added."""
    candidates = [key]
    if prefix and key.startswith(f"{prefix}."):
        candidates.append(key[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{key}")
    return next((name for name in candidates if name in checkpoint), None)


def iter_rows(total: int, row_bytes: int, max_bytes: int) -> Iterator[slice]:
    """Slices of ``range(total)`` of at most ``max_bytes`` (one row at least)."""
    step = max(1, max_bytes // max(1, row_bytes))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))
