"""``SkillPackModel``: the PEFT tuner that puts SkillPack layers on the modules a pack changed."""

import hashlib

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import HfGraftError
from .config import SkillPackConfig
from .layer import Embedding, Linear, Norm, SkillPackLayer

#: Elements of each weight that enter the fingerprint: a fixed stride over the flat tensor.
FINGERPRINT_SAMPLES = 65_536


def base_fingerprint(model: nn.Module, module_names) -> str:
    """SHA-256 over names, shapes, dtypes and a strided sample of the named modules' base weights.

    Sampling keeps this fast on billions of parameters; a fine-tuned or different base changes
    essentially every weight, so the sample changes with it.
    """
    modules = dict(model.named_modules())
    digest = hashlib.sha256()
    for name in sorted(module_names):
        module = modules[name]
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        weight = module.weight.detach()
        flat = weight.reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].float().cpu().contiguous()
        digest.update(f"{name}|{tuple(weight.shape)}|{weight.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def layer_class(module: nn.Module):
    """The SkillPack layer class for a module, or ``None`` when SkillPacks do not support it."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return Linear
    if isinstance(module, nn.Embedding):
        return Embedding
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return Norm
    return None


class SkillPackModel(BaseTuner):
    """Applies SkillPacks (GraftLLM, arXiv 2505.18502) to a transformers model, PEFT-style.

    Use it through peft: ``PeftModel.from_pretrained(base, "org/skillpack")`` or
    ``get_peft_model(base, config)`` with a config written by extraction. Several packs can sit
    on one model (``load_adapter``, ``set_adapter``); ``merge_and_unload`` bakes the active ones in.
    """

    prefix: str = "skillpack_"
    tuner_layer_cls = SkillPackLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: SkillPackConfig, model_config: dict) -> SkillPackConfig:
        if not peft_config.module_specs:
            raise HfGraftError(
                "This SkillPackConfig describes no stored deltas (module_specs is empty): make a SkillPack "
                "with hf_graft.extract_skillpack(base, tuned, config) or load one with PeftModel.from_pretrained."
            )
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: SkillPackConfig, key: str) -> bool:
        # Modules are named exactly by module_specs. target_modules stays unset: peft reads embedding
        # names there as "save the full embedding matrix", which would defeat the compression.
        return key in peft_config.module_specs

    def _pre_injection_hook(self, model: nn.Module, config: SkillPackConfig, adapter_name: str) -> None:
        modules = dict(model.named_modules())
        missing = sorted(set(config.module_specs) - set(modules))
        if missing:
            raise HfGraftError(
                f"SkillPack {adapter_name!r} changes modules this model does not have ({', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}): it was extracted from another architecture."
            )
        if config.check_base_fingerprint and config.base_fingerprint:
            found = base_fingerprint(model, config.module_specs)
            if found != config.base_fingerprint:
                raise HfGraftError(
                    f"SkillPack {adapter_name!r} was extracted from another base model (weights fingerprint "
                    f"{config.base_fingerprint[:12]}..., this model {found[:12]}...). Load the base it was made "
                    "for, or pass check_base_fingerprint=False to apply it anyway."
                )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        spec = config.module_specs[current_key]
        compressed = kwargs.get("compressed", {}).get(current_key)
        if isinstance(target, SkillPackLayer):
            target.update_layer(adapter_name, spec, compressed)
            return
        cls = layer_class(target)
        if cls is None:
            raise HfGraftError(f"SkillPacks cannot be applied to {current_key} ({type(target).__name__}).")
        new_module = cls(target, adapter_name, spec, compressed)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad = False
