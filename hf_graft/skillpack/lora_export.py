"""A SkillPack as a standard PEFT LoRA adapter, for serving engines that load LoRA and nothing else.

Low-rank deltas become LoRA factors exactly (``lora_B @ lora_A = B @ A``, each module at its own
rank through ``rank_pattern``, with ``alpha_pattern`` equal to it so the scaling is 1). Other
matrices (quantized, sparse, fp16) are exact at rank ``min(rows, cols)``, which ``sparse_rank``
allows or caps; a capped one is its best approximation (truncated SVD), error reported. Norm and
bias deltas cannot be expressed by LoRA at all and are left out, also reported. The exported file
holds only the LoRA factors.

An output head tied to a packed embedding gets the embedding's factors through peft's
``ensure_weight_tying`` (stored once), so the unmerged LoRA equals the pack. peft merges a LoRA on
both halves of a tied matrix into it twice; to merge, untie the head first (see :class:`LoraExport`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import HfGraftError
from ..safetensors_io import atomic_write_json, save_tensors
from .compression.formats import CompressedDelta
from .files import SkillPackFile, pack_of

__all__ = ["LoraExport", "export_lora"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: modules exported exactly, approximated (with relative error), left out.

    ``tied`` maps each output head that shares the factors of its tied embedding to that embedding.
    Merging such a LoRA with peft adds the shared delta twice to the one matrix; untie the head
    before ``merge_and_unload()``::

        head = lora.get_base_model().get_output_embeddings().get_base_layer()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        merged = lora.merge_and_unload()
        merged.config.tie_word_embeddings = False
    """

    path: str
    exact: list = field(default_factory=list)
    approximated: dict = field(default_factory=dict)
    left_out: list = field(default_factory=list)
    tied: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)
    nbytes: int = 0

    def lossy(self, threshold: float = 0.1) -> dict:
        """``{module: relative error}`` of the approximations worse than ``threshold``."""
        return {name: error for name, error in self.approximated.items() if error > threshold}


def _lowrank(delta: CompressedDelta, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, cols], B [rows, r], relative error)`` with ``B @ A`` the stored delta, exactly where it can be.

    Low-rank deltas are their own factors. Any other matrix is exact at rank ``min(rows, cols)``
    (one factor is the delta, the other the identity); below that it is the best rank-``max_rank``
    approximation (truncated SVD) and its error is measured.
    """
    if delta.kind == "lowrank":
        a, b = delta.lowrank()
        return a, b, 0.0
    dense = delta.delta().float()
    rows, cols = dense.shape
    if max_rank >= min(rows, cols):
        if rows >= cols:
            return torch.eye(cols), dense, 0.0
        return dense, torch.eye(rows), 0.0
    u, singular, vh = torch.linalg.svd(dense, full_matrices=False)
    b, a = u[:, :max_rank] * singular[:max_rank], vh[:max_rank]
    error = float(torch.linalg.vector_norm(dense - b @ a) / torch.linalg.vector_norm(dense).clamp_min(1e-30))
    return a, b, error


def export_lora(
    pack: SkillPackFile | PeftModel,
    model: nn.Module | None,
    out_dir: str | os.PathLike,
    *,
    sparse_rank: int = 64,
    dtype: str = "float16",
    warn_error: float = 0.1,
) -> LoraExport:
    """Write ``pack`` as a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``pack`` is a read pack (:func:`~.files.read_skillpack`) or a ``PeftModel`` holding it as
    ``"default"``. ``model`` is the base architecture the pack is for (``None`` with a
    ``PeftModel``); only its module types are read, so a model built on the meta device
    (``with torch.device("meta"): AutoModelForCausalLM.from_config(...)``) will do. ``dtype`` is that
    of the written factors.

    A delta that is not low rank is written exactly when ``sparse_rank`` reaches its smaller
    side, and as its best rank-``sparse_rank`` approximation otherwise; ``report.ranks`` holds the
    rank each module got, ``report.approximated`` the relative error of each approximation, and a
    warning is logged when one is above ``warn_error``.
    """
    if isinstance(pack, PeftModel):
        model = model if model is not None else pack.get_base_model()
        pack = pack_of(pack)
    if model is None:
        raise HfGraftError("export_lora needs the base architecture (model) to know each module's layout.")
    if dtype not in DTYPES:
        raise HfGraftError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if sparse_rank < 1:
        raise HfGraftError(f"sparse_rank must be at least 1, got {sparse_rank}.")
    modules = {
        name: module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        for name, module in model.named_modules()
    }
    missing = sorted(set(pack.deltas) - set(modules))
    if missing:
        raise HfGraftError(f"The model has no module {missing[0]!r}: the pack is for another architecture.")
    report = LoraExport(os.fspath(out_dir))
    tensors, ranks, factors, conv1d = {}, {}, {}, False
    for name, parts in pack.deltas.items():
        module = modules[name]
        report.left_out += [f"{name}.{part}" for part in parts if part != "weight"]
        weight = parts.get("weight")
        if weight is None or len(weight.shape) != 2 or not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            report.left_out += [f"{name}.weight"] if weight is not None else []
            continue
        a, b, error = _lowrank(weight, sparse_rank)
        prefix = f"base_model.model.{name}"
        if isinstance(module, nn.Embedding):  # peft: delta = (lora_embedding_B @ lora_embedding_A).T
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = b.T, a.T
        elif isinstance(module, Conv1D):  # peft: delta = (lora_B @ lora_A).T, in the [in, out] layout
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = b.T, a.T
            conv1d = True
        else:
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
        ranks[name] = a.shape[0]
        if error:
            report.approximated[name] = error
        else:
            report.exact.append(name)
        factors[name] = (a, b)
    report.ranks = dict(ranks)
    if report.lossy(warn_error):
        logger.warning(
            "The LoRA approximates %s with relative error above %s; raise sparse_rank (up to the smaller side "
            "of each matrix) to export them exactly.", ", ".join(sorted(report.lossy(warn_error))), warn_error,
        )
    report.tied = {head: source for head, source in pack.config.tied_modules.items() if source in factors}
    tied = set(report.tied)
    if tied:
        logger.warning(
            "%s shares its tied embedding's LoRA factors; peft's merge_and_unload() would add that delta twice. "
            "Untie the head before merging (see LoraExport).", ", ".join(sorted(tied)),
        )
    if not ranks:
        raise HfGraftError("The pack holds no weight delta LoRA can express (only norms and biases).")
    tensors = {key: value.to(DTYPES[dtype]).contiguous() for key, value in tensors.items()}
    top = max(ranks.values())
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks | dict.fromkeys(tied, 0)),
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        fan_in_fan_out=conv1d,
        lora_dropout=0.0,
        ensure_weight_tying=bool(tied),  # a tied head shares the embedding's factors: added once, merged once
        bias="none",
        base_model_name_or_path=pack.config.base_model_name_or_path,
        task_type=pack.config.task_type,
    )
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    data = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    atomic_write_json(os.path.join(out_dir, "adapter_config.json"), data)
    report.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return report
