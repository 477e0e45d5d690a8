"""``extract_skillpack``: (tuned model or LoRA adapter) - base model -> a compressed SkillPack on the base."""

import copy
import os
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import HfGraftError
from .calibrate import compress_delta_calibrated, input_hessians
from .compress import allocate, compress_delta
from .config import SkillPackConfig
from .files import SkillPackFile, attach
from .model import base_fingerprint, layer_class, tied_partners

BF16_BYTES = 2

Tuned = Union[nn.Module, PeftModel, str, os.PathLike]


def weight_deltas(base_model: nn.Module, tuned_model: nn.Module) -> dict:
    """``{module name: {"weight": dW, "bias": db}}`` for every supported module that changed.

    A weight shared by several modules (tied input and output embeddings) is one delta, kept
    under the first module that holds it.
    """
    base_modules, tuned_modules = dict(base_model.named_modules()), dict(tuned_model.named_modules())
    if set(base_modules) != set(tuned_modules):
        extra = sorted(set(base_modules) ^ set(tuned_modules))[:5]
        raise HfGraftError(f"The tuned model's modules differ from the base's ({', '.join(extra)} ...): not the same architecture.")
    deltas, seen = {}, set()
    for name, base in base_modules.items():
        if layer_class(base) is None or isinstance(base, BaseTunerLayer):
            continue
        tuned = tuned_modules[name]
        parts = {}
        for part in ("weight", "bias"):
            before, after = getattr(base, part, None), getattr(tuned, part, None)
            if before is None or id(before) in seen:
                continue
            seen.add(id(before))
            if after is None or after.shape != before.shape:
                raise HfGraftError(f"{name}.{part} has shape {tuple(before.shape)} in the base but not in the tuned model.")
            delta = after.detach().float() - before.detach().float()
            if torch.count_nonzero(delta):
                parts[part] = delta
        if parts:
            deltas[name] = parts
    return deltas


def delta_spectrum(deltas: dict, fractions: tuple = (0.01, 0.1)) -> dict:
    """How low-rank a delta is: the share of its energy in the top ``fractions`` of singular values.

    ``deltas`` is :func:`weight_deltas`' (or :func:`lora_deltas`') ``{module: {part: tensor}}``;
    the energies of every matrix are summed, so a large matrix weighs more. Returns
    ``{"energy_top1pct": ..., "energy_top10pct": ...}`` (keys follow ``fractions``). A delta with
    most of its energy in a few directions compresses well at high ratios; a near full-rank one
    does not.
    """
    total, tops = 0.0, [0.0] * len(fractions)
    for parts in deltas.values():
        for delta in parts.values():
            if delta.dim() != 2:
                continue
            energy = torch.linalg.svdvals(delta.float()).double().square()
            total += float(energy.sum())
            for i, fraction in enumerate(fractions):
                tops[i] += float(energy[: max(1, round(fraction * energy.numel()))].sum())
    if total == 0.0:
        raise HfGraftError("delta_spectrum needs at least one non-zero 2-D delta.")
    return {f"energy_top{fraction * 100:g}pct": top / total for fraction, top in zip(fractions, tops)}


def lora_deltas(adapted: PeftModel) -> dict:
    """``{module name: {"weight": dW, ...}}`` of a LoRA ``PeftModel``'s active adapters, exact (``B @ A * scaling``).

    Modules fully trained beside the adapter (``modules_to_save``) contribute their whole delta.
    """
    configs = [adapted.peft_config[name] for name in adapted.active_adapters]
    if any(config.peft_type.value != "LORA" for config in configs):
        kinds = sorted({config.peft_type.value for config in configs})
        raise HfGraftError(f"extract_skillpack reads LoRA adapters, got {', '.join(kinds)}: merge it into a full model first.")
    deltas = {}
    for name, module in adapted.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in adapted.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
            if any(module.use_dora.get(a, False) for a in adapters):
                raise HfGraftError(f"{name} uses DoRA, whose update is not additive; merge it into a full model first.")
            if adapters:
                deltas[name] = {"weight": sum(module.get_delta_weight(a).detach().float() for a in adapters)}
        elif isinstance(module, ModulesToSaveWrapper):
            adapter = module.active_adapters[0] if module.active_adapters else None
            if adapter in module.modules_to_save:
                changed = weight_deltas(module.original_module, module.modules_to_save[adapter])
                deltas.update({f"{name}.{sub}" if sub else name: parts for sub, parts in changed.items()})
    return deltas


def _delta_source(base_model: nn.Module, tuned: Tuned) -> tuple[dict, nn.Module, nn.Module]:
    """``(deltas, model to calibrate on, clean base to host the pack)`` for a tuned model or a LoRA adapter."""
    if isinstance(tuned, (str, os.PathLike)):
        if isinstance(base_model, PeftModel):
            raise HfGraftError("Pass the plain base model, not a PeftModel, with a LoRA adapter path.")
        tuned = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tuned))
    if isinstance(tuned, PeftModel):
        return lora_deltas(tuned), tuned, copy.deepcopy(tuned).unload()
    if isinstance(base_model, PeftModel):
        raise HfGraftError("base_model is a PeftModel: pass the plain base model (merge or unload adapters first).")
    return weight_deltas(base_model, tuned), tuned, base_model


def _calibration_batches(calibration: Iterable[Any], limit: int) -> tuple[list, int]:
    """The calibration batches, cut to ``limit`` sequences when it is positive, and their sequence count."""
    batches, count = [], 0
    for batch in calibration:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.dim() in (1, 2) and ids.numel()):
            raise HfGraftError("Calibration batches must be non-empty LongTensors of input_ids (or dicts holding them).")
        if ids.dim() == 1:
            ids = ids[None]
            batch = {**batch, "input_ids": ids} if isinstance(batch, dict) else ids
        if limit and count + len(ids) > limit:
            keep = limit - count
            batch = {key: value[:keep] for key, value in batch.items()} if isinstance(batch, dict) else ids[:keep]
        batches.append(batch)
        count += len(batch["input_ids"] if isinstance(batch, dict) else batch)
        if limit and count >= limit:
            break
    if not batches:
        raise HfGraftError("The calibration set is empty: give at least one batch of input_ids.")
    return batches, count


def extract_skillpack(
    base_model: nn.Module,
    tuned: Tuned,
    config: Optional[SkillPackConfig] = None,
    *,
    calibration: Optional[Iterable[Any]] = None,
    adapter_name: str = "default",
    copy_base: bool = True,
    progress: bool = True,
):
    """Compress ``tuned - base_model`` into a SkillPack on (a copy of) ``base_model``.

    ``tuned`` is a fine-tuned copy of the base, or a LoRA adapter on it: a LoRA ``PeftModel`` or
    the path / Hub id of one (its exact ``B @ A`` deltas are recompressed). Ranks, bit widths and
    kept fractions are allocated across modules to fit ``config.target_ratio`` (or
    ``config.byte_budget``) with the least measured error. With ``calibration`` (batches of
    ``input_ids``, or dicts of model inputs), low-rank deltas of linear modules are compressed
    against the activations the tuned model feeds them (see :mod:`.calibrate`); at most
    ``config.calibration_samples`` sequences are used when it is positive. Returns a
    ``PeftModel`` whose ``save_pretrained`` / ``push_to_hub`` write the pack.
    """
    config = copy.deepcopy(config) if config is not None else SkillPackConfig()
    if calibration is None and config.calibration_samples:
        raise HfGraftError(
            f"calibration_samples={config.calibration_samples} asks for calibrated compression: "
            "pass calibration=[input_ids, ...] (or leave calibration_samples at 0)."
        )
    deltas, calibration_model, clean_base = _delta_source(base_model, tuned)
    if not deltas:
        raise HfGraftError("The tuned model has the same weights as the base: there is no skill to extract.")
    batches = None
    if calibration is not None:
        batches, config.calibration_samples = _calibration_batches(calibration, config.calibration_samples)
    flat = {f"{name}.{part}": delta for name, parts in deltas.items() for part, delta in parts.items()}
    bf16_bytes = sum(delta.numel() * BF16_BYTES for delta in flat.values())
    budget = config.byte_budget or int(bf16_bytes / config.target_ratio)
    sparse = {key for key in flat if any(key.rsplit(".", 1)[0].endswith(s) for s in config.sparse_modules)}
    specs = allocate(flat, byte_budget=budget, sparse=sparse, progress=progress)

    modules = dict(clean_base.named_modules())
    compressed = {}
    if batches is not None:
        calibrated = [
            name
            for name in deltas
            if "weight" in deltas[name]
            and specs[f"{name}.weight"]["kind"] == "lowrank"
            and isinstance(modules[name], (nn.Linear, Conv1D))
        ]
        widths = {name: deltas[name]["weight"].shape[0 if isinstance(modules[name], Conv1D) else 1] for name in calibrated}
        inner = calibration_model.base_model.model if isinstance(calibration_model, PeftModel) else calibration_model
        hessians = input_hessians(
            calibration_model, widths, batches, modules=dict(inner.named_modules()), progress=progress
        )
        for name, hessian in hessians:
            compressed[f"{name}.weight"] = compress_delta_calibrated(
                deltas[name]["weight"],
                specs[f"{name}.weight"],
                hessian,
                fan_in_fan_out=isinstance(modules[name], Conv1D),
            )
    for key, delta in flat.items():
        if key not in compressed:
            compressed[key] = compress_delta(delta, specs[key])

    stored_bytes, error_sq, total_sq, by_module, module_errors = 0, 0.0, 0.0, {}, {}
    for key, delta in flat.items():
        name, part = key.rsplit(".", 1)
        packed = compressed[key]
        by_module.setdefault(name, {})[part] = packed
        stored_bytes += packed.nbytes
        error = float(torch.sum((delta - packed.delta()) ** 2))
        norm = float(torch.sum(delta**2))
        module_errors[key] = (error / norm) ** 0.5
        error_sq += error
        total_sq += norm
    config.module_specs = {name: {part: c.meta for part, c in parts.items()} for name, parts in by_module.items()}
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(clean_base, "name_or_path", None) or None
    config.tied_modules = tied_partners(clean_base, config.module_specs)
    config.base_fingerprint = base_fingerprint(clean_base, config.module_specs)
    config.measured = {
        "delta_bf16_bytes": bf16_bytes,
        "stored_bytes": stored_bytes,
        "compression_ratio": bf16_bytes / stored_bytes,
        "relative_error": (error_sq / total_sq) ** 0.5 if total_sq else 0.0,
        "module_errors": module_errors,
    }
    host = copy.deepcopy(clean_base) if copy_base and clean_base is base_model else clean_base
    return attach(host, SkillPackFile(config, by_module), adapter_name)
