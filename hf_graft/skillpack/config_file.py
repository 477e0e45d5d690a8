"""Reading ``adapter_config.json`` of a SkillPack strictly, on every path peft takes to it.

peft parses an adapter's config before it knows the adapter's type (``PeftConfig._get_peft_type``,
``PeftConfig.from_pretrained``, ``AutoPeftModel*``), all through ``PeftConfigMixin.from_json_file``.
:func:`install` wraps that one method: for a folder that holds a SkillPack (its config says so, or
its weights file holds SkillPack tensors) the file is read by :func:`read_config_data`, so a
truncated, corrupt or mistyped config raises one :class:`~hf_graft.errors.HfGraftError` naming the
file and the field, before peft uses any value. Other adapters' configs are read exactly as before.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from peft.config import PeftConfigMixin

from ..errors import HfGraftError
from ..safetensors_io import MAX_HEADER_BYTES, read_json
from .config import LOADING_OPTIONS, check_fields, decode_layout
from .integrity import PAYLOAD_KEY, WEIGHTS_NAME

MAX_CONFIG_BYTES = 64 << 20
_DECLARES_SKILLPACK = re.compile(rb'"peft_type"\s*:\s*"SKILLPACK"')
_SKILLPACK_TENSORS = (b".skillpack_tensors.", PAYLOAD_KEY.encode())
_FIX = "Download the pack again or re-save it."


def read_config_data(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a SkillPack's ``adapter_config.json`` at ``path``, parsed and checked
    (:func:`~hf_graft.skillpack.config.check_fields`). Unknown fields are kept for peft to judge;
    loading options (``verify_integrity``, ``check_base_fingerprint``) found in a file are dropped."""
    path = os.fspath(path)
    data = read_json(path, _FIX, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise HfGraftError(f"{path} must hold a JSON object; the file is corrupt. {_FIX}")
    if data.get("peft_type") != "SKILLPACK":
        raise HfGraftError(
            f"{path} describes a {data.get('peft_type')!r:.40} adapter, but its folder holds a SkillPack's weights: "
            f"the config is damaged. {_FIX}"
        )
    for option in LOADING_OPTIONS:  # options of one load: a file never sets them for the user
        data.pop(option, None)
    if "layout" in data:
        if "module_specs" in data or "tied_modules" in data:
            raise HfGraftError(f"{path} holds both a layout and module_specs or tied_modules: the config is damaged. {_FIX}")
        data["module_specs"], data["tied_modules"] = decode_layout(data.pop("layout"), path)
    check_fields(data, source=path)
    measured = data.get("measured", {})
    if "compression_ratio" not in measured and measured.get("stored_bytes") and "delta_bf16_bytes" in measured:
        measured["compression_ratio"] = round(measured["delta_bf16_bytes"] / measured["stored_bytes"], 2)  # not saved: it is this quotient
    return data


def holds_skillpack(folder: str) -> bool:
    """Whether ``folder`` holds a SkillPack: its config declares one, or its weights file's header
    names SkillPack tensors (so a config too damaged to say is still recognised)."""
    try:
        with open(os.path.join(folder, "adapter_config.json"), "rb") as handle:
            if _DECLARES_SKILLPACK.search(handle.read(MAX_CONFIG_BYTES)):
                return True
    except OSError:
        pass
    try:
        with open(os.path.join(folder, WEIGHTS_NAME), "rb") as handle:
            prefix = handle.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            header = handle.read(min(size, MAX_HEADER_BYTES))
            return any(marker in header for marker in _SKILLPACK_TENSORS)
    except OSError:
        return False


def install() -> None:
    """Route peft's reading of ``adapter_config.json`` through :func:`read_config_data` for SkillPack
    folders (idempotent)."""
    read = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(read, "_reads_skillpacks", False):
        return

    def from_json_file(cls, path_json_file, **kwargs):
        if holds_skillpack(os.path.dirname(os.fspath(path_json_file)) or "."):
            return read_config_data(path_json_file)
        return read(cls, path_json_file, **kwargs)

    from_json_file.__doc__ = read.__doc__
    from_json_file._reads_skillpacks = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)
