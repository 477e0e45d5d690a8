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

from ...errors import HfGraftError
from ..compression.distillation import distill_scales
from ..compression.objective import ModuleStatistics, collect_statistics
from ..config import END_TO_END_DISTILL_STEPS, SkillPackConfig
from ..files import attach
from ..model import base_weight, fingerprint_sample, layer_class, tied_partners
from .calibration_data import general_perplexity, resolve_calibration
from .generated import generated_calibration
from .journal import Journal
from .packing import resolve_device
from .pipeline import BlockSweep, Pipeline

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


class ModelDeltas:
    """The deltas of a loaded tuned model, or of a LoRA adapter, against the base (the pipeline's
    source of deltas, :class:`~.pipeline.DeltaSource`).

    ``tuned`` is a tuned copy of ``base_model``, a LoRA ``PeftModel`` on it or the path / Hub id of
    a LoRA adapter. ``calibration_model`` is the model that computes the tuned outputs (the
    ``PeftModel`` for an adapter), ``clean_base`` the base without adapters, to host the pack.
    """

    def __init__(self, base_model: nn.Module, tuned: Tuned):
        if isinstance(tuned, (str, os.PathLike)):
            if isinstance(base_model, PeftModel):
                raise HfGraftError("Pass the plain base model, not a PeftModel, with a LoRA adapter path.")
            tuned = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tuned))
        if isinstance(tuned, PeftModel):
            deltas, self.calibration_model, self.clean_base = lora_deltas(tuned), tuned, copy.deepcopy(tuned).unload()
        elif isinstance(base_model, PeftModel):
            raise HfGraftError("base_model is a PeftModel: pass the plain base model (merge or unload adapters first).")
        else:
            deltas, self.calibration_model, self.clean_base = weight_deltas(base_model, tuned), tuned, base_model
        if not deltas:
            raise HfGraftError("The tuned model has the same weights as the base: there is no skill to extract.")
        self.modules = dict(self.clean_base.named_modules())
        self.flat = {f"{name}.{part}": delta for name, parts in deltas.items() for part, delta in parts.items()}
        self.keys = list(self.flat)
        self.matrices = [name for name in deltas if "weight" in deltas[name] and deltas[name]["weight"].dim() == 2]
        self.conv1d = {name for name, module in self.modules.items() if isinstance(module, Conv1D)}
        self.tied = tied_partners(self.clean_base, deltas)
        self.model_class = type(self.clean_base)

    def _base(self, key: str) -> torch.Tensor:
        name, part = key.rsplit(".", 1)
        return base_weight(self.modules[name]) if part == "weight" else getattr(self.modules[name], part)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.flat[key].shape) if key in self.flat else tuple(self._base(key).shape)

    def delta(self, key: str, device: torch.device) -> torch.Tensor:
        return self.flat[key].to(device)

    def sample(self, key: str) -> bytes:
        return fingerprint_sample(self._base(key).detach())


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
    calibration: Union[Iterable[Any], str, os.PathLike, None] = None,
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

    ``calibration``: batches of ``input_ids`` (or dicts of model inputs: the skill's own examples,
    with ``labels`` on their answers, make the best pack), a ``.safetensors`` file of samples,
    ``"generate"`` (sequences the tuned model samples itself, the loss taken where it departs from
    the base, see :mod:`~hf_graft.skillpack.extraction.generated`; no tokenizer needed),
    ``"pydoc"`` (general text from the embedded corpus, tokenized with ``tokenizer`` or the base's
    own), or ``None`` (the default) for data-free extraction: each delta's Frobenius error relative
    to its norm, no distillation. Without the skill's inputs a calibration set misleads the
    objective: on byte-level GPT-NeoX addition fine-tunes (prompts never in the loss), packs
    calibrated on generated text kept 10-71% of the skill at 16x where data-free ones kept 63-94%.
    With ``config.general_text`` the skill's batches get general text mixed in. At most ``config.calibration_samples`` sequences are used. Returns a
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
    deltas = ModelDeltas(base_model, tuned)
    clean_base = deltas.clean_base
    batches = resolve_calibration(
        calibration, tokenizer, clean_base, config, distill_steps=END_TO_END_DISTILL_STEPS,
        sampler=lambda samples, length: generated_calibration(deltas.calibration_model, clean_base, samples, length, progress=progress),
        vocabulary=getattr(clean_base.config, "vocab_size", None),
    )
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(clean_base, "name_or_path", None) or None
    statistics = BlockSweep() if batches is None else ModelStatistics(deltas, batches, config, progress)
    pack = Pipeline(deltas, config, Journal(None, ""), resolve_device(device), progress).run(statistics)
    host = copy.deepcopy(clean_base) if copy_base and clean_base is base_model else clean_base
    before = {"base": clean_base, "tuned": deltas.calibration_model}
    general = general_perplexity(before, clean_base, tokenizer)  # before the pack shares the base's modules
    attached = attach(host, pack, adapter_name)
    if general is not None:
        general.update(general_perplexity({"pack": attached}, clean_base, tokenizer))
        attached.peft_config[adapter_name].measured["general_perplexity"] = general
    return attached


class ModelStatistics(BlockSweep):
    """What each module's error costs, measured on the loaded tuned model over ``batches`` (the
    pipeline's source of statistics for loaded models with calibration).

    Collected once before measuring. With ``config.compensation``, each decoder block's statistics
    are collected again before it is compressed, on the tuned model in which every earlier block
    already carries its compressed delta (GPTQ's and DeltaZip's sequential scheme), so the errors
    of earlier blocks are compensated, not compounded; the tuned model's weights are changed in
    place for that and restored once every block is compressed (no copy of it is made). With
    ``config.distill_steps``, the stored values are then trained end to end
    (:func:`~..compression.distillation.distill_scales`).
    """

    def __init__(self, deltas: ModelDeltas, batches: list, config: SkillPackConfig, progress: bool = True):
        self.deltas, self.batches, self.config, self.progress = deltas, batches, config, progress
        model = deltas.calibration_model
        self.inner_modules = dict((model.base_model.model if isinstance(model, PeftModel) else model).named_modules())
        self.measuring = config.objective == "output"
        self.compensate = config.compensation and self.measuring
        self._undo: list = []
        super().__init__(self._collect(deltas.matrices) if self.measuring else {})

    def _collect(self, names: list[str]) -> dict:
        tied = self.deltas.tied
        wanted = _two_d(self.inner_modules, [*names, *(head for head, source in tied.items() if source in names)])
        found = collect_statistics(self.deltas.calibration_model, wanted, self.batches, progress=self.progress)
        return _tie_statistics(found, tied)

    def block_statistics(self, keys: list[str], kept: dict[str, dict]) -> dict:
        names = [key.rsplit(".", 1)[0] for key in keys if key.endswith(".weight") and self.deltas.flat[key].dim() == 2]
        return {**self.statistics, **self._collect(names)} if self.compensate and names else self.statistics

    def compressed(self, block: dict) -> None:
        if self.compensate:
            for key, packed in block.items():
                name, part = key.rsplit(".", 1)
                self._undo.append(_apply_compressed(self.inner_modules[name], part, self.deltas.flat[key], packed))

    def compress(self, pipeline: Pipeline, kept: dict[str, dict]) -> None:
        try:
            super().compress(pipeline, kept)
        finally:
            for restore in reversed(self._undo):
                restore()
            self._undo = []

    def finish(self, pipeline: Pipeline, compressed: dict) -> tuple[dict, list[float]]:
        if not self.config.distill_steps:
            return compressed, []
        return distill_scales(
            self.deltas.clean_base, self.deltas.calibration_model, compressed, self.batches,
            steps=self.config.distill_steps, learning_rate=self.config.distill_learning_rate, progress=self.progress,
        )


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
