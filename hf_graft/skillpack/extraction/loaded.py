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
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ...errors import HfGraftError
from .calibration_data import default_batches, limited_batches
from ..config import END_TO_END_DISTILL_STEPS, SkillPackConfig
from ..compression.distillation import distill_scales
from ..files import attach
from ..model import base_fingerprint, layer_class, tied_partners
from ..compression.objective import ModuleStatistics, collect_statistics
from .packing import BF16_BYTES, assemble, block_groups, choose, compress, delta_error_sq, measure, resolve_device

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


def _two_d(modules: dict, names: Iterable[str]) -> dict:
    """The linear and embedding modules among ``names`` (adapter-wrapped ones by their base layer)."""
    found = {}
    for name in names:
        module = modules[name]
        module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            found[name] = module
    return found


def _tie_statistics(statistics: dict, tied: dict) -> dict:
    """Tied heads share their embedding's delta: the embedding is measured through the head (the
    dense second moment GPTQ can use), its token frequencies added to the head's output weights."""
    combined = dict(statistics)
    for head, source in tied.items():
        if head in statistics and source in statistics:
            embedding, output = statistics[source], statistics[head]
            combined[source] = ModuleStatistics(output.hessian, output.row_weights, also=(embedding,))
    return combined


def extract_skillpack(
    base_model: nn.Module,
    tuned: Tuned,
    config: Optional[SkillPackConfig] = None,
    *,
    calibration: Union[Iterable[Any], str, None] = "pydoc",
    tokenizer=None,
    adapter_name: str = "default",
    copy_base: bool = True,
    progress: bool = True,
    output_dir: Union[str, os.PathLike, None] = None,
    device: str = "auto",
):
    """Compress ``tuned - base_model`` into a SkillPack on (a copy of) ``base_model``.

    ``tuned`` is a fine-tuned copy of the base, or a LoRA adapter on it: a LoRA ``PeftModel`` or
    the path / Hub id of one (its exact ``B @ A`` deltas are recompressed).

    The pack is made for what the model computes, not for weight error (see
    :mod:`..compression.objective`, :mod:`..compression.allocation`, :mod:`..compression.distillation`):

    1. On the calibration batches, each module's input second moment and output sensitivity are
       measured on the tuned model.
    2. Every module's candidate formats (direct 1-4 bit quantization, signs with a low-rank
       correction, mixed-precision low rank, sparse, left out) are compressed and measured by
       what their error costs; one per module is chosen to fit ``config.target_ratio`` (or
       ``config.byte_budget``) counting the saved files' bytes, headers and metadata included.
    3. Decoder blocks are compressed in order, GPTQ-compensated, each measured on the model with
       the earlier blocks' compressed deltas already applied (``config.compensation``).
    4. The stored scales, zeros and fp16 values are trained for ``config.distill_steps`` steps (200
       when unset) so
       the base plus the pack matches the tuned model's next-token distributions.

    ``calibration``: ``"pydoc"`` (default: general text from the embedded corpus, tokenized with
    ``tokenizer`` or the base's own), batches of ``input_ids`` (or dicts of model inputs; pass the
    skill's own prompts for the best pack), or ``None`` for data-free extraction (Frobenius error,
    no distillation). At most ``config.calibration_samples`` sequences are used. Returns a
    ``PeftModel`` whose ``save_pretrained`` / ``push_to_hub`` write the pack.

    ``device``: where the compression runs (``"auto"``: the GPU when there is one). ``base_model``
    and ``tuned`` may instead be checkpoint folders or Hub ids: the checkpoints are then read
    tensor by tensor and neither model is loaded: a calibrated pack is then made with the model
    run one decoder block at a time (:mod:`~hf_graft.skillpack.extraction.sequential`), a data-free one
    (``calibration=None``) delta by delta, and either is written to ``output_dir`` resumably
    (:func:`~hf_graft.skillpack.extraction.checkpoints.extract_from_checkpoints`); a
    :class:`~hf_graft.skillpack.files.SkillPackFile` is returned.
    """
    if isinstance(base_model, (str, os.PathLike)):
        from .checkpoints import extract_from_checkpoints

        return extract_from_checkpoints(
            base_model, tuned, config, calibration=calibration, tokenizer=tokenizer, output_dir=output_dir, device=device, progress=progress,
        )
    if output_dir is not None:
        raise HfGraftError("output_dir is for extraction from checkpoint folders; call save_pretrained on the returned model.")
    config = copy.deepcopy(config) if config is not None else SkillPackConfig()
    deltas, calibration_model, clean_base = _delta_source(base_model, tuned)
    if not deltas:
        raise HfGraftError("The tuned model has the same weights as the base: there is no skill to extract.")
    if isinstance(calibration, str):
        if calibration != "pydoc":
            raise HfGraftError(f"calibration must be 'pydoc', batches of input_ids or None, got {calibration!r}.")
        calibration = default_batches(clean_base, tokenizer, config.calibration_samples)
    batches = None
    if calibration is not None:
        batches, config.calibration_samples = limited_batches(calibration, config.calibration_samples)
        config.distill_steps = END_TO_END_DISTILL_STEPS if config.distill_steps is None else config.distill_steps
    else:
        config.calibration_samples, config.distill_steps = 0, 0
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(clean_base, "name_or_path", None) or None
    inner = calibration_model.base_model.model if isinstance(calibration_model, PeftModel) else calibration_model
    inner_modules = dict(inner.named_modules())
    modules = dict(clean_base.named_modules())
    conv1d = {name for name, module in modules.items() if isinstance(module, Conv1D)}
    flat = {f"{name}.{part}": delta for name, parts in deltas.items() for part, delta in parts.items()}
    bf16_bytes = sum(delta.numel() * BF16_BYTES for delta in flat.values())
    tied = tied_partners(clean_base, deltas)
    matrices = [name for name in deltas if "weight" in deltas[name] and deltas[name]["weight"].dim() == 2]

    def statistics_of(model_modules: dict, model: nn.Module, names) -> dict:
        if batches is None or config.objective != "output":
            return {}
        wanted = _two_d(model_modules, [*names, *(head for head, source in tied.items() if source in names)])
        found = collect_statistics(model, wanted, batches, progress=progress)
        return _tie_statistics(found, tied)

    statistics = statistics_of(inner_modules, calibration_model, matrices)
    device = resolve_device(device)

    def on_device(key: str):
        stats = statistics.get(key.rsplit(".", 1)[0])
        return flat[key].to(device), (stats.to(device) if stats is not None else None)

    bases = {}  # A^T of the factors of data-free low-rank candidates, reused to compress
    measured = {
        key: measure(key, *on_device(key), config, conv1d=key.rsplit(".", 1)[0] in conv1d, bases=bases)
        for key in tqdm(flat, desc="Measuring SkillPack candidates", disable=not progress)
    }
    kept = choose(measured, config, bf16_bytes, type(clean_base))
    compressed = _compress_in_order(
        flat, kept, modules, inner_modules, calibration_model, statistics, statistics_of, conv1d,
        compensate=config.compensation and batches is not None, device=device, bases=bases,
    )
    distill_losses = []
    if batches is not None and config.distill_steps:
        compressed, distill_losses = distill_scales(
            clean_base, calibration_model, compressed, batches, steps=config.distill_steps, learning_rate=config.distill_learning_rate, progress=progress,
        )
    errors_sq = {key: delta_error_sq(flat[key], packed, conv1d=key.rsplit(".", 1)[0] in conv1d) for key, packed in compressed.items()}
    kept_modules = {key.rsplit(".", 1)[0] for key in compressed}
    pack = assemble(
        config, compressed, measured, errors_sq, bf16_bytes=bf16_bytes, model_class=type(clean_base), tied_modules=tied,
        fingerprint=base_fingerprint(clean_base, kept_modules), distill_losses=distill_losses,
    )
    host = copy.deepcopy(clean_base) if copy_base and clean_base is base_model else clean_base
    return attach(host, pack, adapter_name)


def _compress_in_order(flat, specs, modules, inner_modules, calibration_model, statistics, statistics_of, conv1d, *, compensate, device, bases):
    """Compress every chosen delta, decoder block by decoder block in forward order.

    With ``compensate``, each block's statistics are measured again on the tuned model in which
    every earlier block already carries its compressed delta (GPTQ's and DeltaZip's sequential
    scheme), so the errors of earlier blocks are compensated, not compounded. The tuned model's
    weights are changed in place for that and restored before this returns: no copy of it is made.
    """
    compressed, changed = {}, []
    names = [name for name in modules if any(key.rsplit(".", 1)[0] == name for key in specs)]
    try:
        for group in block_groups(names):
            current = statistics
            if compensate and any(f"{name}.weight" in specs and flat[f"{name}.weight"].dim() == 2 for name in group):
                measured = [n for n in group if f"{n}.weight" in specs]
                current = {**statistics, **statistics_of(inner_modules, calibration_model, measured)}
            for name in group:
                for part in ("weight", "bias"):
                    key = f"{name}.{part}"
                    if key in specs:
                        stats = current.get(name)
                        stats = stats.to(device) if stats is not None else None
                        compressed[key] = packed = compress(key, flat[key].to(device), specs[key], stats, conv1d=name in conv1d,
                                                            basis=bases.pop(key, None))
                        if compensate:
                            changed.append(_apply_compressed(inner_modules[name], part, flat[key], packed))
    finally:
        for restore in reversed(changed):
            restore()
    return compressed


@torch.no_grad()
def _apply_compressed(module: nn.Module, part: str, delta: torch.Tensor, packed):
    """Put base + compressed delta in place of the tuned weight (tuned - delta + decoded); returns its undo."""
    target = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    parameter = getattr(target, part)
    original = parameter.detach().clone()
    parameter.copy_((parameter.float() - delta + packed.delta()).to(parameter.dtype))

    def restore() -> None:
        with torch.no_grad():
            parameter.copy_(original)

    return restore
