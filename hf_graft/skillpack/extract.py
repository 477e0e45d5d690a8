"""``extract_skillpack``: tuned model - base model -> a compressed SkillPack on the base."""

import copy
from typing import Optional

import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import HfGraftError
from .compress import allocate, compress_delta
from .config import SkillPackConfig
from .model import base_fingerprint, layer_class

BF16_BYTES = 2


def weight_deltas(base_model: nn.Module, tuned_model: nn.Module) -> dict:
    """``{module name: {"weight": dW, "bias": db}}`` for every supported module that changed."""
    base_modules, tuned_modules = dict(base_model.named_modules()), dict(tuned_model.named_modules())
    if set(base_modules) != set(tuned_modules):
        extra = sorted(set(base_modules) ^ set(tuned_modules))[:5]
        raise HfGraftError(f"The tuned model's modules differ from the base's ({', '.join(extra)} ...): not the same architecture.")
    deltas = {}
    for name, base in base_modules.items():
        if layer_class(base) is None or isinstance(base, BaseTunerLayer):
            continue
        tuned = tuned_modules[name]
        parts = {}
        for part in ("weight", "bias"):
            before, after = getattr(base, part, None), getattr(tuned, part, None)
            if before is None:
                continue
            if after is None or after.shape != before.shape:
                raise HfGraftError(f"{name}.{part} has shape {tuple(before.shape)} in the base but not in the tuned model.")
            delta = after.detach().float() - before.detach().float()
            if torch.count_nonzero(delta):
                parts[part] = delta
        if parts:
            deltas[name] = parts
    return deltas


def extract_skillpack(
    base_model: nn.Module,
    tuned_model: nn.Module,
    config: Optional[SkillPackConfig] = None,
    *,
    adapter_name: str = "default",
    copy_base: bool = True,
):
    """Compress ``tuned_model - base_model`` into a SkillPack on (a copy of) ``base_model``.

    Ranks, bit widths and kept fractions are allocated across modules to fit
    ``config.target_ratio`` (or ``config.byte_budget``) with the least measured error. Returns a
    ``PeftModel`` whose ``save_pretrained`` / ``push_to_hub`` write the pack.
    """
    config = copy.deepcopy(config) if config is not None else SkillPackConfig()
    deltas = weight_deltas(base_model, tuned_model)
    if not deltas:
        raise HfGraftError("The tuned model has the same weights as the base: there is no skill to extract.")
    flat = {f"{name}.{part}": delta for name, parts in deltas.items() for part, delta in parts.items()}
    bf16_bytes = sum(delta.numel() * BF16_BYTES for delta in flat.values())
    budget = config.byte_budget or int(bf16_bytes / config.target_ratio)
    sparse = {key for key in flat if any(key.rsplit(".", 1)[0].endswith(s) for s in config.sparse_modules)}
    specs = allocate(flat, byte_budget=budget, sparse=sparse)
    compressed, stored_bytes, error_sq, total_sq = {}, 0, 0.0, 0.0
    for key, delta in flat.items():
        name, part = key.rsplit(".", 1)
        packed = compress_delta(delta, specs[key])
        compressed.setdefault(name, {})[part] = packed
        stored_bytes += packed.nbytes
        error_sq += float(torch.sum((delta - packed.delta()) ** 2))
        total_sq += float(torch.sum(delta**2))
    config.module_specs = {name: {part: c.meta for part, c in parts.items()} for name, parts in compressed.items()}
    config.base_fingerprint = base_fingerprint(base_model, config.module_specs)
    config.measured = {
        "delta_bf16_bytes": bf16_bytes,
        "stored_bytes": stored_bytes,
        "compression_ratio": bf16_bytes / stored_bytes,
        "relative_error": (error_sq / total_sq) ** 0.5 if total_sq else 0.0,
    }
    host = copy.deepcopy(base_model) if copy_base else base_model
    model = get_peft_model(host, config, adapter_name=adapter_name)
    for name, module in model.base_model.model.named_modules():
        if name in compressed:
            module.update_layer(adapter_name, config.module_specs[name], compressed[name])
    return model
