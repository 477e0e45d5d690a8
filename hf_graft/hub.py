"""Model cards for everything hf-graft saves or pushes, rendered from ``hub_templates/``."""

import os
from importlib import resources
from typing import Optional

import jinja2
from huggingface_hub import EvalResult, ModelCardData

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
    from .metrics import footprint  # evaluate is imported when a graft's card is written, not before

    size = footprint(model)
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


def write_skillpack_card(card: dict, save_directory: str, *, repo_id: Optional[str] = None, tags: Optional[list] = None) -> str:
    """Render and write ``README.md`` for a SkillPack from ``card``, its facts; return its path.

    ``card`` holds ``base_model``, ``figures`` (``stored_bytes``, ``delta_bf16_bytes``,
    ``compression_ratio``, ``relative_error``, ``distill_loss``, ``digest``), ``rows`` (one per stored
    delta), ``evaluation`` (the retention record, or None), ``calibration_samples``,
    ``distill_steps``, ``tied_modules``, ``omitted`` and ``general_perplexity`` (base, tuned and pack
    perplexity on general text, or None), as
    :meth:`hf_graft.skillpack.SkillPackFile.card_data` gives them.
    """
    title = os.path.basename(repo_id) if repo_id else "SkillPack"
    data = ModelCardData(
        library_name="peft",
        base_model=card["base_model"] or None,
        pipeline_tag="text-generation",
        tags=sorted({*SKILLPACK_TAGS, *(tags or [])}),
        model_name=title,
    )
    text = template_environment().get_template("skillpack_model_card.md.j2").render(
        metadata=data.to_yaml(),
        title=title,
        base_model=card["base_model"] or "the-base-model",
        config=card,
        figures=card["figures"],
        evaluation=card["evaluation"],
        rows=card["rows"],
        repo_id=repo_id or "path/to/this/skillpack",
    )
    path = os.path.join(save_directory, "README.md")
    atomic_write_text(path, text)
    return path


def write_fusion_card(
    save_directory: str, *, skills: list, mode: str, rows: list, base_model: Optional[str], repo_id: Optional[str] = None
) -> str:
    """Render and write ``README.md`` for fused SkillPacks: ``rows`` holds each pack's ``skill``,
    ``bytes`` and ``ratio``; ``mode`` is the router's."""
    title = os.path.basename(repo_id) if repo_id else "fused-skillpacks"
    data = ModelCardData(
        library_name="peft",
        base_model=base_model or None,
        pipeline_tag="text-generation",
        tags=sorted({*SKILLPACK_TAGS, "skill-fusion"}),
        model_name=title,
    )
    card = template_environment().get_template("fusion_model_card.md.j2").render(
        metadata=data.to_yaml(), title=title, skills=skills, mode=mode, rows=rows,
        base_model=base_model or "the-base-model", repo_id=repo_id or "path/to/this/model",
    )
    path = os.path.join(save_directory, "README.md")
    atomic_write_text(path, card)
    return path
