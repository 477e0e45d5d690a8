"""A SkillPack merged into a base checkpoint shard by shard: the base is never loaded whole.

:func:`merge_into_checkpoint` writes the merged model with the base's own shards, index and dtype
(or a dtype asked for), one tensor in memory at a time. Each changed tensor is ``base + delta``
cast to the stored dtype, as ``merge_and_unload`` computes it on the base loaded in that dtype,
so loading the result equals merging in memory. Config, generation config and tokenizer files
are copied beside it. The output folder appears only once complete, and only if the base's
fingerprint matched the pack's (checked on the way, from the tensors being merged).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from ..errors import HfGraftError
from ..safetensors_io import atomic_write_json
from ..sharded import INDEX_NAME, Checkpoint, iter_rows, meta_model, stored_name, write_shard
from .files import SkillPackFile, read_skillpack
from .model import check_fingerprint, fingerprint_of, fingerprint_stride, sign_bytes
from .extraction.packing import resolve_device

__all__ = ["merge_into_checkpoint"]

#: Files beside the weights that are never copied: pickles, which hf-graft never reads or passes on.
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def merge_into_checkpoint(
    pack: Union[SkillPackFile, str, os.PathLike],
    base: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    *,
    dtype: Optional[torch.dtype] = None,
    check_base_fingerprint: bool = True,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
) -> str:
    """Write ``base`` with ``pack`` merged into ``output_dir``, shard by shard; returns the folder.

    ``pack`` is a :class:`SkillPackFile`, a SkillPack folder or Hub id; ``base`` a model folder or
    Hub id. ``dtype`` casts every floating tensor (default: each keeps its stored dtype).
    ``device``: where the deltas' low-rank products are computed, the bulk of the work (``"auto"``:
    the GPU when there is one). On the CPU the result equals ``merge_and_unload`` bit for bit; on a
    GPU it is within float32 rounding of it.
    """
    device = resolve_device(device)
    pack = pack if isinstance(pack, SkillPackFile) else read_skillpack(pack, check_codes=False)  # decoded below
    checkpoint = Checkpoint(base)
    skeleton = meta_model(checkpoint.folder)
    prefix = getattr(skeleton, "base_model_prefix", "")
    changes: dict[str, tuple[str, str]] = {}  # stored tensor -> (module, part)
    for module, parts in pack.deltas.items():
        for part in parts:
            name = stored_name(f"{module}.{part}", checkpoint, prefix)
            if name is None:
                raise HfGraftError(f"{checkpoint.reference} holds no tensor for {module}.{part}, which the SkillPack changes.")
            if checkpoint.shape(name) != tuple(parts[part].shape):
                raise HfGraftError(f"{checkpoint.reference}: {name} is {checkpoint.shape(name)}, the SkillPack's delta {tuple(parts[part].shape)}.")
            changes[name] = (module, part)
    weights = {stored_name(f"{module}.weight", checkpoint, prefix): module for module in pack.deltas}
    weights.pop(None, None)
    output = os.path.abspath(os.fspath(output_dir))
    if os.path.isfile(output) or (os.path.isdir(output) and os.listdir(output)):
        raise HfGraftError(f"{output_dir} already exists and is not empty; give a new folder for the merged model.")
    staging = output + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    samples: dict[str, tuple[bytes, tuple]] = {}

    def produce(name: str) -> torch.Tensor:
        tensor = checkpoint.read(name)
        if name in weights:  # sampled as stored: a cast to fp16 could flush tiny weights to zero
            samples[weights[name]] = (sign_bytes(tensor.reshape(-1)[:: fingerprint_stride(tensor.numel())]), tuple(tensor.shape))
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensor = tensor.to(target)
        if name in changes:
            module, part = changes[name]
            packed = pack.deltas[module][part]
            if tensor.dim() < 2:
                tensor += packed.delta().to(target)
            for rows in iter_rows(len(tensor), tensor[0].numel() * 4, 64 << 20) if tensor.dim() > 1 else []:
                tensor[rows] += packed.delta_rows(rows.start, rows.stop, device).to("cpu", target)
        return tensor

    try:
        for shard in tqdm(checkpoint.shards, desc="Merging the SkillPack", unit="shard", disable=not progress):
            layout = []
            for name in checkpoint.shard_keys[shard]:
                stored = checkpoint.dtype(name)
                layout.append((name, dtype if dtype is not None and stored.is_floating_point else stored, checkpoint.shape(name)))
            write_shard(os.path.join(staging, shard), layout, produce, metadata={"format": "pt"})
        if check_base_fingerprint and pack.config.base_fingerprint:
            check_fingerprint(pack.config, fingerprint_of(samples.items()))
        _copy_beside(checkpoint, staging, dtype)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(output):
        os.rmdir(output)
    os.replace(staging, output)
    return output


def _copy_beside(checkpoint: Checkpoint, staging: str, dtype: Optional[torch.dtype]) -> None:
    """Copy the base's other files (config, generation config, tokenizer); the index and config follow ``dtype``."""
    for name in sorted(os.listdir(checkpoint.folder)):
        path = os.path.join(checkpoint.folder, name)
        if name in checkpoint.shards or name.startswith(".") or name.endswith(_PICKLES) or not os.path.isfile(path):
            continue
        if name == INDEX_NAME:
            with open(path, encoding="utf-8") as handle:
                index = json.load(handle)
            if dtype is not None:
                total = sum(
                    math.prod(checkpoint.shape(key)) * (dtype.itemsize if checkpoint.dtype(key).is_floating_point else checkpoint.dtype(key).itemsize)
                    for key in checkpoint.keys()
                )
                index.setdefault("metadata", {})["total_size"] = total
            atomic_write_json(os.path.join(staging, name), index)
        elif name == "config.json" and dtype is not None:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = str(dtype).removeprefix("torch.")
            atomic_write_json(os.path.join(staging, name), config)
        else:
            shutil.copyfile(path, os.path.join(staging, name))
