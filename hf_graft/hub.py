"""Model cards for everything hf-graft saves or pushes, rendered from ``hub_templates/``."""

import math
import os
from importlib import resources
from typing import Optional

import jinja2
from huggingface_hub import EvalResult, ModelCardData

from . import metrics
from .safetensors_io import atomic_write_text

TEMPLATES = {"grafted_vision": "vision_model_card.md.j2", "grafted_causal_lm": "causal_lm_model_card.md.j2"}
TASKS = {"grafted_vision": "image-classification", "grafted_causal_lm": "text-generation"}
SKILLPACK_TAGS = ("hf-graft", "skillpack", "graftllm", "knowledge-grafting")


def template_environment() -> jinja2.Environment:
    """The Jinja environment over the packaged ``hub_templates``."""
    folder = resources.files("hf_graft.hub_templates")
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: folder.joinpath(name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _card_data(config, task: str, tags: Optional[list], title: str) -> ModelCardData:
    dataset = config.graft_dataset
    results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset or "custom",
            dataset_name=dataset or "custom",
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in config.graft_metrics.items()
        if not name.startswith(("donor", "host", "vanilla", "tuned"))
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=sorted({"hf-graft", "knowledge-grafting", task, *(tags or [])}),
        datasets=[dataset] if dataset and "/" in dataset else None,
        model_name=title,
        eval_results=results or None,
    )


def write_model_card(model, save_directory: str, tags: Optional[list] = None, repo_id: Optional[str] = None) -> str:
    """Render and write ``README.md`` for a saved graft; return its path."""
    config = model.config
    model_type = config.model_type
    if model_type not in TEMPLATES:
        raise ValueError(f"No model card template for model_type {model_type!r}.")
    size = metrics.footprint(model)
    title = os.path.basename(repo_id) if repo_id else f"grafted-{config.donor_name or model_type}"
    data = _card_data(config, TASKS[model_type], tags, title)
    card = template_environment().get_template(TEMPLATES[model_type]).render(
        metadata=data.to_yaml(),
        title=title,
        config=config,
        params=size["parameters"],
        megabytes=size["megabytes"],
        metrics=config.graft_metrics,
        repo_id=repo_id or "path/to/this/model",
    )
    path = os.path.join(save_directory, "README.md")
    atomic_write_text(path, card)
    return path


def skillpack_figures(pack) -> dict:
    """Bytes and ratio of a pack: as extraction measured them (the saved files, headers included) when
    recorded, else from its stored tensors."""
    measured = pack.config.measured
    bf16_bytes = measured.get("delta_bf16_bytes") or sum(
        2 * math.prod(delta.shape) for parts in pack.deltas.values() for delta in parts.values()
    )
    stored = measured.get("stored_bytes") or pack.nbytes
    return {
        "stored_bytes": stored,
        "delta_bf16_bytes": bf16_bytes,
        "compression_ratio": measured.get("compression_ratio") or bf16_bytes / max(1, stored),
        "relative_error": measured.get("relative_error"),
        "distill_loss": measured.get("distill_loss"),
        "digest": pack.digest,
    }


def write_skillpack_card(
    pack, save_directory: str, *, repo_id: Optional[str] = None, tags: Optional[list] = None
) -> str:
    """Render and write ``README.md`` for a SkillPack (a :class:`~hf_graft.skillpack.SkillPackFile`); return its path.

    The card gives the base model, the compression figures, the skill retention when
    ``config.measured["evaluation"]`` holds one (:func:`hf_graft.skillpack.record_evaluation`)
    and a per-module table.
    """
    config = pack.config
    base_model = config.base_model_name_or_path or "the-base-model"
    figures = skillpack_figures(pack)
    title = os.path.basename(repo_id) if repo_id else "SkillPack"
    data = ModelCardData(
        library_name="peft",
        base_model=config.base_model_name_or_path or None,
        pipeline_tag="text-generation",
        tags=sorted({*SKILLPACK_TAGS, *(tags or [])}),
        model_name=title,
    )
    card = template_environment().get_template("skillpack_model_card.md.j2").render(
        metadata=data.to_yaml(),
        title=title,
        base_model=base_model,
        config=config,
        figures=figures,
        evaluation=config.measured.get("evaluation"),
        rows=pack.summary(),
        repo_id=repo_id or "path/to/this/skillpack",
    )
    path = os.path.join(save_directory, "README.md")
    atomic_write_text(path, card)
    return path


def write_fusion_card(fused, save_directory: str, *, repo_id: Optional[str] = None) -> str:
    """Render and write ``README.md`` for fused SkillPacks (a ``FusedSkillPacks``): the packs, the router, the base."""
    from .skillpack.files import read_skillpack

    rows, base_model = [], None
    for skill in fused.skills:
        pack = read_skillpack(os.path.join(save_directory, skill))
        figures = skillpack_figures(pack)
        rows.append({"skill": skill, "bytes": figures["stored_bytes"], "ratio": figures["compression_ratio"]})
        base_model = base_model or pack.config.base_model_name_or_path
    title = os.path.basename(repo_id) if repo_id else "fused-skillpacks"
    data = ModelCardData(
        library_name="peft",
        base_model=base_model or None,
        pipeline_tag="text-generation",
        tags=sorted({*SKILLPACK_TAGS, "skill-fusion"}),
        model_name=title,
    )
    card = template_environment().get_template("fusion_model_card.md.j2").render(
        metadata=data.to_yaml(), title=title, skills=fused.skills, mode=fused.mode, rows=rows,
        base_model=base_model or "the-base-model", repo_id=repo_id or "path/to/this/model",
    )
    path = os.path.join(save_directory, "README.md")
    atomic_write_text(path, card)
    return path
