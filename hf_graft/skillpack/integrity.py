"""A SkillPack's weights file: where it is, what it must hold, and the digest that proves it intact.

Every stored tensor of a pack is a 1-D ``uint8`` payload whose size its ``module_specs`` entry
fixes. The weights file holds them end to end, in the order of their keys, as one tensor
(:data:`PAYLOAD_KEY`), so its header is a few dozen bytes whatever the number of modules; files
written with one tensor per stored delta (as peft names them, :func:`tensor_key`) are read too.
A damaged header (a tensor renamed, resized, re-typed, moved) is caught by comparing the file's
header with that layout. A damaged payload is not: flipped bytes inside packed codes
or scales decode to a different skill without any error. The pack's ``tensor_digest`` closes that
gap: SHA-256 over every stored tensor (name, dtype, shape, bytes) and the metadata that decodes
them (``module_specs``, ``tied_modules``), recorded in ``adapter_config.json`` when the pack is
saved and recomputed from the file on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..errors import HfGraftError
from ..safetensors_io import DTYPE_NAMES, atomic_path, load_tensors, read_checked_header, safetensors_header
from .compression.formats import stored_layout

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
DIGEST_PREFIX = "sha256:"
#: The one tensor of a weights file: every stored tensor of the pack, end to end in key order.
PAYLOAD_KEY = "skillpack_payload"
_CHUNK = 16 << 20


def tensor_key(module: str, tensor_name: str) -> str:
    """The key of one stored tensor in ``adapter_model.safetensors``, as peft saves it."""
    return f"base_model.model.{module}.skillpack_tensors.{tensor_name.replace('.', '_')}"


def expected_layout(module_specs: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> ``(shape, dtype)`` of every tensor the weights file of a pack with ``module_specs`` holds."""
    expected = {}
    for module, parts in module_specs.items():
        for part, meta in parts.items():
            expected.update({tensor_key(module, name): value for name, value in stored_layout(part, meta).items()})
    return expected


def payload_spans(module_specs: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Key -> ``(start, stop)`` byte span of every stored tensor inside the payload (:data:`PAYLOAD_KEY`)."""
    spans, offset = {}, 0
    for key, (shape, dtype) in sorted(expected_layout(module_specs).items()):
        if dtype != torch.uint8 or len(shape) != 1:
            raise HfGraftError(f"A SkillPack stores 1-D uint8 payloads; {key} would be {dtype} {tuple(shape)}.")
        spans[key] = (offset, offset + shape[0])
        offset += shape[0]
    return spans


def payload_bytes(module_specs: Mapping) -> int:
    """Bytes of the payload of a pack with ``module_specs``."""
    return max((stop for _, stop in payload_spans(module_specs).values()), default=0)


def is_packed(header: Mapping[str, Any]) -> bool:
    """Whether a weights file's header is of one payload tensor (else: one tensor per stored delta)."""
    return PAYLOAD_KEY in header


def split_payload(payload: torch.Tensor, module_specs: Mapping) -> dict[str, torch.Tensor]:
    """The stored tensors under their keys (views of ``payload``, a 1-D uint8 tensor of exactly their bytes)."""
    spans = payload_spans(module_specs)
    size = payload_bytes(module_specs)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != size:
        raise HfGraftError(f"The SkillPack payload is {payload.dtype} {tuple(payload.shape)}; its layout needs uint8 ({size},).")
    return {key: payload[start:stop] for key, (start, stop) in spans.items()}


def stored_tensors(path: str, module_specs: Mapping) -> dict[str, torch.Tensor]:
    """Every stored tensor of the weights file at ``path``, under its key, its header checked first."""
    header = read_checked_header(path)
    if not is_packed(header):
        tensors, _ = load_tensors(path, expected_layout(module_specs))
        return tensors
    tensors, _ = load_tensors(path, {PAYLOAD_KEY: ((payload_bytes(module_specs),), torch.uint8)})
    return split_payload(tensors[PAYLOAD_KEY], module_specs)


def _check_packed(path: str, module_specs: Mapping) -> int:
    """The payload's offset in the file's data, once the header is checked to hold exactly the payload ``module_specs`` needs."""
    header = read_checked_header(path, {PAYLOAD_KEY: ((payload_bytes(module_specs),), torch.uint8)})
    return header[PAYLOAD_KEY]["data_offsets"][0]


def payload_header(size: int, metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The bytes before the data of a weights file whose payload is ``size`` bytes."""
    return safetensors_header([(PAYLOAD_KEY, torch.uint8, (size,))], metadata)


def write_payload(path: str | os.PathLike, sizes: Mapping[str, int], produce, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a weights file (atomically) of one payload: ``produce(key)`` for each key of ``sizes``
    in key order, each checked to be a 1-D uint8 tensor of its size, written and dropped."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(payload_header(sum(sizes.values()), metadata))
        for key in sorted(sizes):
            tensor = produce(key)
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (sizes[key],):
                raise HfGraftError(f"{key} came out {tensor.dtype} {tuple(tensor.shape)}; its layout says uint8 ({sizes[key]},).")
            handle.write(memoryview(tensor.detach().cpu().contiguous().numpy()))
            del tensor


def pack_weights_file(path: str, module_specs: Mapping) -> None:
    """Rewrite a weights file of one tensor per stored delta (as peft saves adapters) as one payload, in place."""
    header = read_checked_header(path)
    if is_packed(header):
        return
    tensors, metadata = load_tensors(path, expected_layout(module_specs))
    spans = payload_spans(module_specs)
    write_payload(path, {key: stop - start for key, (start, stop) in spans.items()}, tensors.__getitem__, metadata)


def _start(structure: Mapping) -> "hashlib._Hash":
    digest = hashlib.sha256()
    digest.update(json.dumps(structure, sort_keys=True, separators=(",", ":")).encode())
    return digest


def _entry(name: str, dtype: str, shape) -> bytes:
    return f"\0{name}\0{dtype}\0{list(shape)}\0".encode()


def tensors_digest(tensors: Mapping[str, torch.Tensor], structure: Optional[Mapping] = None) -> str:
    """``"sha256:..."`` over ``structure`` (JSON) and every tensor's name, dtype, shape and bytes."""
    digest = _start(structure or {})
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(_entry(name, DTYPE_NAMES[tensor.dtype], tensor.shape))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return DIGEST_PREFIX + digest.hexdigest()


def _pack_structure(module_specs: Mapping, tied_modules: Mapping) -> dict:
    return {"module_specs": module_specs, "tied_modules": tied_modules}


def pack_digest(module_specs: Mapping, tied_modules: Mapping, tensors: Mapping[str, torch.Tensor]) -> str:
    """The ``tensor_digest`` of a pack whose stored tensors are ``tensors`` (keys as in the file)."""
    return tensors_digest(tensors, _pack_structure(module_specs, tied_modules))


def file_digest(path: str, module_specs: Mapping, tied_modules: Mapping, header: Optional[dict] = None) -> str:
    """:func:`pack_digest` of the tensors stored in the safetensors file at ``path``, read span by span
    (the same for a file of one payload and a file of one tensor per stored delta)."""
    header = read_checked_header(path) if header is None else header
    digest = _start(_pack_structure(module_specs, tied_modules))
    if is_packed(header):
        base = _check_packed(path, module_specs)
        spans = {key: ("U8", [stop - start], (base + start, base + stop)) for key, (start, stop) in payload_spans(module_specs).items()}
    else:
        spans = {key: (info["dtype"], info["shape"], tuple(info["data_offsets"])) for key, info in header.items() if key != "__metadata__"}
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        start = 8 + header_size
        for name in sorted(spans):
            dtype, shape, (begin, end) = spans[name]
            digest.update(_entry(name, dtype, shape))
            handle.seek(start + begin)
            while begin < end:
                chunk = handle.read(min(_CHUNK, end - begin))
                if not chunk:
                    raise HfGraftError(f"{path} ended while its tensor {name!r} was read: the file is truncated.")
                digest.update(chunk)
                begin += len(chunk)
    return DIGEST_PREFIX + digest.hexdigest()


def check_weights_file(
    path: str, module_specs: Mapping, tied_modules: Mapping, digest: Optional[str], *, verify: bool = True
) -> None:
    """Refuse the weights file at ``path`` unless it holds exactly the tensors ``module_specs`` describes
    and, when ``verify`` and the pack records a ``digest``, its bytes are the ones that were saved.

    Raises :class:`~hf_graft.errors.HfGraftError` naming the file and the fix.
    """
    header = read_checked_header(path)
    if is_packed(header):
        _check_packed(path, module_specs)
    else:
        header = read_checked_header(path, expected_layout(module_specs))
    if not verify or digest is None:
        return
    found = file_digest(path, module_specs, tied_modules, header)
    if found != digest:
        raise HfGraftError(
            f"{path} is not the file this SkillPack was saved with: its tensors' digest is {found[:19]}..., "
            f"adapter_config.json records {digest[:19]}... The file was damaged in download or on disk; "
            "download the pack again (force_download=True) or re-save it from its source. Pass "
            "verify_integrity=False to load it anyway."
        )


def locate(path_or_repo: str | os.PathLike, name: str, subfolder: Optional[str] = None, **hub_kwargs) -> str:
    """The local path of the file ``name`` of a SkillPack folder or Hub repo (downloaded to the cache).

    A folder that holds a pickled ``adapter_model.bin`` instead of safetensors weights is refused:
    a pickle can run code when it is opened.
    """
    path = os.fspath(path_or_repo)
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder):
        found = os.path.join(folder, name)
        if os.path.isfile(found):
            return found
        pickled = name == WEIGHTS_NAME and os.path.exists(os.path.join(folder, PICKLED_WEIGHTS_NAME))
        extra = f" (it holds a pickled {PICKLED_WEIGHTS_NAME}, which is never read)" if pickled else ""
        what = "SkillPacks are read from safetensors only" if name == WEIGHTS_NAME else "it is not a SkillPack folder"
        raise HfGraftError(f"{folder} holds no {name}{extra}: {what}.")
    if os.path.exists(path):
        raise HfGraftError(f"{path} is a file; give the SkillPack's folder or Hub repo id.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return hf_hub_download(path, name, subfolder=subfolder, **hub_kwargs)
    except HFValidationError as error:
        raise HfGraftError(f"{path!r} is neither a SkillPack folder nor a Hub repo id.") from error
    except (HfHubHTTPError, OSError) as error:
        raise HfGraftError(f"Could not download {name} of the SkillPack {path!r} from the Hub: {error}") from error
