"""``SkillPackModel``: the PEFT tuner that puts SkillPack layers on the modules a pack changed."""

import hashlib
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import BaseModelMismatchError, HfGraftError
from .compression.formats import check_meta
from .config import SkillPackConfig
from .integrity import PAYLOAD_KEY, expected_layout, pack_digest, split_payload
from .layer import Embedding, Linear, Norm, SkillPackLayer, TiedLinear

#: Elements of each weight that enter the fingerprint: a fixed stride over the flat tensor.
FINGERPRINT_SAMPLES = 65_536


def base_fingerprint(model: nn.Module, module_names) -> str:
    """SHA-256 over names, shapes and the signs of a strided sample of the named modules' base weights.

    Signs survive every cast between float dtypes, so a base loaded in fp32, bf16 or fp16 gives the
    same fingerprint, while a fine-tuned or different base flips the signs of many sampled weights
    and so changes it. Sampling keeps this fast on billions of parameters.
    """
    modules = dict(model.named_modules())
    return fingerprint_of((name, base_weight(modules[name]).detach()) for name in module_names)


def fingerprint_sample(weight: torch.Tensor) -> bytes:
    """The signs (0, 1, 2) of a fixed stride of ``weight``'s elements: what the fingerprint hashes of it."""
    flat = weight.reshape(-1)
    return sign_bytes(flat[:: fingerprint_stride(flat.numel())])


def fingerprint_stride(numel: int) -> int:
    """The stride of the fingerprint's sample over a weight of ``numel`` elements."""
    return max(1, numel // FINGERPRINT_SAMPLES)


def sign_bytes(sample: torch.Tensor) -> bytes:
    """The signs of ``sample`` as bytes 0, 1, 2 (negative, zero, positive)."""
    return (torch.sign(sample).to(torch.int8) + 1).to(torch.uint8).cpu().contiguous().numpy().tobytes()


def fingerprint_of(weights) -> str:
    """:func:`base_fingerprint` of ``(module name, base weight)`` pairs (weights or their
    :func:`fingerprint_sample` with the shape, as ``(bytes, shape)``), in any order."""
    digest = hashlib.sha256()
    for name, weight in sorted(weights, key=lambda item: item[0]):
        sample, shape = weight if isinstance(weight, tuple) else (fingerprint_sample(weight), tuple(weight.shape))
        digest.update(f"{name}|{tuple(shape)}|".encode())
        digest.update(sample)
    return digest.hexdigest()


def check_fingerprint(config: SkillPackConfig, found: str, adapter_name: str = "default") -> None:
    """Raise :class:`BaseModelMismatchError` when the base's fingerprint ``found`` is not the pack's."""
    if found != config.base_fingerprint:
        raise BaseModelMismatchError(
            f"SkillPack {adapter_name!r} was extracted from another base model (weights fingerprint "
            f"{config.base_fingerprint[:12]}..., this model {found[:12]}...). Load the base it was made "
            "for, or pass check_base_fingerprint=False to apply it anyway."
        )


def tied_partners(model: nn.Module, module_names) -> dict:
    """``{module: source}`` for modules outside ``module_names`` whose weight is a named module's weight.

    A causal LM with tied embeddings has one matrix under two names (``embed_tokens`` and
    ``lm_head``); a SkillPack stores its delta once, under the name in ``module_names``.
    """
    owners = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and name in module_names:
            owners.setdefault(id(weight), name)
    partners = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        owner = owners.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if owner is not None and name != owner and name not in module_names and not isinstance(module, BaseTunerLayer):
            partners[name] = owner
    return partners


def base_weight(module: nn.Module):
    """The weight of ``module``, of its base layer when an adapter wraps it."""
    return (module.get_base_layer() if isinstance(module, BaseTunerLayer) else module).weight


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
        if not peft_config.inference_mode:
            raise HfGraftError(
                "SkillPacks are frozen: their packed integer codes cannot be trained, so is_trainable=True (or "
                "inference_mode=False) would train nothing. To keep training, merge the pack (merge_and_unload()), "
                "add a LoRA on top, and extract a new SkillPack from the result."
            )
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
        return key in peft_config.module_specs or key in peft_config.tied_modules

    def _pre_injection_hook(self, model: nn.Module, config: SkillPackConfig, adapter_name: str) -> None:
        modules = dict(model.named_modules())
        missing = sorted(set(config.module_specs) - set(modules))
        if missing:
            raise HfGraftError(
                f"SkillPack {adapter_name!r} changes modules this model does not have ({', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}): it was extracted from another architecture."
            )
        for name, parts in config.module_specs.items():
            base = modules[name].get_base_layer() if isinstance(modules[name], BaseTunerLayer) else modules[name]
            for part, meta in parts.items():
                check_meta(meta, f"{name}.{part}")
                param = getattr(base, part, None)
                if not isinstance(param, torch.Tensor) or tuple(param.shape) != tuple(meta["shape"]):
                    found = tuple(param.shape) if isinstance(param, torch.Tensor) else "none"
                    raise HfGraftError(
                        f"SkillPack {adapter_name!r} stores a {tuple(meta['shape'])} delta for {name}.{part}, "
                        f"which is {found} in this model: it was extracted from another architecture."
                    )
        for head, source in config.tied_modules.items():
            if head not in modules or source not in modules or base_weight(modules[head]) is not base_weight(modules[source]):
                raise HfGraftError(
                    f"SkillPack {adapter_name!r} was extracted from a model whose {head} shares its weight with "
                    f"{source}; in this model it does not. Load the base with its embeddings tied "
                    "(tie_word_embeddings=True)."
                )
        if config.check_base_fingerprint and config.base_fingerprint:
            check_fingerprint(config, base_fingerprint(model, config.module_specs), adapter_name)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key in config.tied_modules:
            new_module = self._tied_layer(config, adapter_name, target, current_key)
            if new_module is None:
                return
        else:
            spec = config.module_specs[current_key]
            if isinstance(target, SkillPackLayer):
                target.update_layer(adapter_name, spec)
                return
            cls = layer_class(target)
            if cls is None:
                raise HfGraftError(f"SkillPacks cannot be applied to {current_key} ({type(target).__name__}).")
            new_module = cls(target, adapter_name, spec)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The tensors checked against the pack's digest (unless ``verify_integrity=False``), then peft's
        key remapping, then every SkillPack tensor checked: none missing, none extra, right shape and dtype.

        The digest is checked here too, not only when the config is read beside its file, so loaders
        that read the weights themselves (transformers' ``model.load_adapter``) verify it as well.
        """
        peft_prefix = "base_model.model."  # transformers' integration strips it before loading
        payload = [key for key in state_dict if key.rsplit(".", 1)[-1] == PAYLOAD_KEY]
        if payload:  # one payload (as hf-graft writes the file): its stored tensors under peft's keys
            if len(payload) > 1 or len(state_dict) > 1:
                raise HfGraftError(f"SkillPack {adapter_name!r}: the weights file holds {sorted(state_dict)[:3]}, not one {PAYLOAD_KEY}.")
            state_dict = {key: value.clone() for key, value in split_payload(state_dict[payload[0]], config.module_specs).items()}
        stored = {
            key if key.startswith(peft_prefix) else peft_prefix + key: value
            for key, value in state_dict.items()
            if ".skillpack_tensors." in key
        }
        if config.verify_integrity and config.tensor_digest and set(stored) == set(expected_layout(config.module_specs)):
            if pack_digest(config.module_specs, config.tied_modules, stored) != config.tensor_digest:
                raise HfGraftError(
                    f"SkillPack {adapter_name!r}: the loaded weights do not match the digest recorded in its "
                    "adapter_config.json: the weights file was damaged in download or on disk. Download the pack "
                    "again, or pass verify_integrity=False to load it anyway."
                )
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        marker = f".skillpack_tensors.{adapter_name}."
        expected = {key: value for key, value in model.state_dict().items() if marker in key}
        found = {key: value for key, value in remapped.items() if ".skillpack_tensors." in key}
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            names = (missing or unexpected)[:3]
            raise HfGraftError(
                f"SkillPack {adapter_name!r}: the weights file {'lacks' if missing else 'has unexpected'} tensors "
                f"{', '.join(names)}{' ...' if len(missing or unexpected) > 3 else ''}; it does not match its config."
            )
        for key, value in found.items():
            want = expected[key]
            if value.shape != want.shape or value.dtype != want.dtype:
                raise HfGraftError(
                    f"SkillPack {adapter_name!r}: {key} is {value.dtype} {tuple(value.shape)} in the file, "
                    f"its config needs {want.dtype} {tuple(want.shape)}."
                )
        return remapped

    def _get_tied_target_modules(self, model: nn.Module) -> list:
        # peft warns that merging into tied embeddings is unsafe; SkillPacks store a tied matrix's delta
        # once and merge it once (TiedLinear), so there is nothing to warn about.
        return []

    def _tied_layer(self, config, adapter_name, target, key):
        """A :class:`TiedLinear` for an output head tied to a packed embedding (``None``: added to an existing one)."""
        source = config.tied_modules[key]
        if isinstance(target, TiedLinear):
            if target.source != source:
                raise HfGraftError(f"{key} is tied to {target.source} in one SkillPack and to {source} in another.")
            target.update_layer(adapter_name, {})
            return None
        if not isinstance(target, (nn.Linear, Conv1D)):
            raise HfGraftError(f"SkillPacks tie {key} to {source}, but {key} is a {type(target).__name__}, not a linear head.")
        return TiedLinear(target, adapter_name, source, self.model)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``adapter_names=[...]`` in a forward or ``generate`` call: each example with its own pack.

        As for peft's LoRA: one name per example, ``"__base__"`` for none; with beam search each
        name is repeated for its beams.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of adapter names, one per example, got {type(adapter_names).__name__}.")
        known = set().union(*(layer.skillpack_tensors.keys() for layer in self.modules() if isinstance(layer, SkillPackLayer)))
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = [
            layer.register_forward_pre_hook(partial(_with_adapter_names, adapter_names=list(adapter_names)), with_kwargs=True)
            for layer in self.modules()
            if isinstance(layer, SkillPackLayer)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad = False


def _with_adapter_names(module, args, kwargs, adapter_names):
    return args, {**kwargs, "adapter_names": adapter_names}
