"""Layer-grafting recipes (``kind: layer_graft``): a whole experiment from one YAML file, run by ``hf-graft run``.

A recipe with ``kind: layer_graft`` names the donor and host models, the task, the block to
specialise, the graft and its translators, the evaluation and where to push::

    kind: layer_graft
    output_dir: runs/graft-pythia         # everything the job writes goes here (relative to the cwd)
    seed: 0
    models:
      donor: EleutherAI/pythia-70m          # the "vanilla" model the block comes from; a folder,
      host: EleutherAI/pythia-70m-deduped   # a Hub id or a tiny model (as in distillation recipes,
                                            # with family: gpt_neox | llama); one tokenizer for both
    task: {modulus: 4, train_size: 2000, test_size: 200}   # modular addition (hf_graft.data)
    specialise: {layer: 3, rank: 8, steps: 300, batch_size: 32, learning_rate: 2.0e-3}
    graft:
      position: 4                 # the block runs after the host's first 4 blocks
      strategy: original          # original: translators trained around the vanilla block, then the
                                  # specialised block swapped in; direct: the specialised one throughout
      translator_init: identity   # or least_squares (paired activations; any pair of widths)
      ridge: 1.0e-4               # least squares' ridge
      data: mixed                 # the translators' data: task | corpus (pydoc text) | mixed
      batches: 12                 # of 16 sequences (corpus windows of 64 tokens)
      loss: residual              # residual | residual_kl | logits
      stages: [pre, post]         # the translators trained, in order; [] keeps them as initialised
      steps: 300                  # per stage
      learning_rate: 1.0e-3
      gate: false                 # true: the graft's output passes through a gate trained to open on
      gate_steps: 1000            # the task and stay shut on general text (the host's own output there)
    evaluation: {samples: 200, text_prompts: 64, mlm: bert-base-uncased, top_k: 5}
    push_to_hub: org/grafted-pythia     # optional

The job: 1. the models (tiny ones built, pretrained and saved once); 2. the donor's block
``specialise.layer`` learns the task with LoRA on that block only (:func:`specialise_block`);
3. the graft: :meth:`GraftedModelForCausalLM.from_models`, then :func:`fit_translators` and
:func:`train_translators`, then the swap, then for a gated graft :func:`train_gate` and the gate's
openness on task prompts and on general text (:func:`record_openness`); 4. the paper's metrics (format-hard, format-soft,
factual on the task's test split; lexical perplexity, MLM predictability with ``evaluation.mlm``,
and perplexity on held-out pydoc text) for the specialised donor, the graft, the host and the
vanilla donor, in ``report.json`` and a table; 5. the push, with the model card.

The recipe is checked whole before any training, including the donor layer and graft position
against the models' configs and the two tokenizers against each other; each step is saved with a
record of what made it, so a rerun resumes after the last finished step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import HfGraftError
from .common import MARKER, Job, check_keys, check_reference, load_model, model_spec, recipe_model, tokenizer_of

__all__ = ["GraftRecipe", "load", "run"]

SECTIONS = ("kind", "output_dir", "seed", "models", "task", "specialise", "graft", "evaluation", "push_to_hub")
REQUIRED = object()  # a setting without a default
_TASK = {"modulus": 4, "train_size": 2000, "test_size": 200}
_SPECIALISE = {"layer": REQUIRED, "rank": 8, "steps": 300, "batch_size": 32, "learning_rate": 2e-3}
_GRAFT = {
    "position": REQUIRED,
    "strategy": "original",
    "translator_init": "identity",
    "ridge": 1e-4,
    "data": "mixed",
    "batches": 12,
    "loss": "residual",
    "stages": ["pre", "post"],
    "steps": 300,
    "learning_rate": 1e-3,
    "gate": False,
    "gate_steps": 1000,
}
_EVALUATION = {"samples": 200, "text_prompts": 64, "mlm": None, "top_k": None}
_CHOICES = {
    "strategy": ("original", "direct"),
    "translator_init": ("identity", "least_squares"),
    "data": ("task", "corpus", "mixed"),
    "loss": ("residual", "residual_kl", "logits"),
}
STEPS = ["models", "specialise", "graft", "evaluation"]
STEP_FOLDERS = {"specialise": "specialised", "graft": "grafted"}


@dataclass
class GraftRecipe:
    """A checked layer-grafting recipe (see the module docstring); build it with :func:`load`."""

    output_dir: str
    models: dict  # role -> ModelSpec
    task: dict
    specialise: dict
    graft: dict
    evaluation: dict
    seed: int = 0
    push_to_hub: str | None = None
    raw: dict = field(default_factory=dict)


def _settings(raw: dict, name: str, defaults: dict) -> dict:
    """``raw[name]`` over ``defaults``; unknown keys and missing :data:`REQUIRED` ones refused."""

    values = check_keys(name, raw.get(name) or {}, tuple(defaults), required=[k for k, v in defaults.items() if v is REQUIRED])
    settings = {**defaults, **values}
    for key, value in settings.items():
        if key in _CHOICES and value not in _CHOICES[key]:
            raise HfGraftError(f"recipe: {name}.{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}.")
        if key == "gate" and not isinstance(value, bool):
            raise HfGraftError(f"recipe: {name}.gate must be true or false, got {value!r}.")
        if key in ("layer", "position", "rank", "steps", "gate_steps", "batch_size", "batches", "modulus", "train_size", "test_size",
                   "samples", "text_prompts") and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise HfGraftError(f"recipe: {name}.{key} must be a non-negative integer, got {value!r}.")
    return settings


def load(raw: dict, *, output_dir: str | None = None) -> GraftRecipe:
    """Check a parsed ``kind: layer_graft`` recipe without training anything; the first problem raises."""

    check_keys("", raw, SECTIONS, required=("models", "specialise", "graft"))
    output_dir = output_dir or raw.get("output_dir")
    if not output_dir:
        raise HfGraftError("recipe: output_dir is required (or pass --out).")
    check_keys("models", raw["models"], ("donor", "host"), required=("donor", "host"))
    models = {role: model_spec(role, entry) for role, entry in raw["models"].items()}
    for spec in models.values():
        if spec.finetune is not None:
            raise HfGraftError(f"recipe: models.{spec.role}.finetune: in a layer graft only the block named in "
                               "specialise learns the task; drop finetune.")
        if spec.reference is not None:
            check_reference(spec)
    task = _settings(raw, "task", _TASK)
    if task["modulus"] < 2:
        raise HfGraftError(f"recipe: task.modulus must be at least 2, got {task['modulus']}.")
    specialise = _settings(raw, "specialise", _SPECIALISE)
    graft = _settings(raw, "graft", _GRAFT)
    if not isinstance(graft["stages"], list) or set(graft["stages"]) - {"pre", "post"}:
        raise HfGraftError(f"recipe: graft.stages must be a list of pre and/or post, got {graft['stages']!r}.")
    evaluation = _settings(raw, "evaluation", _EVALUATION)
    recipe = GraftRecipe(
        output_dir=str(output_dir),
        models=models,
        task=task,
        specialise=specialise,
        graft=graft,
        evaluation=evaluation,
        seed=raw.get("seed", 0),
        push_to_hub=raw.get("push_to_hub"),
        raw=raw,
    )
    _check_models(recipe)
    return recipe


def _config(spec):
    """The model's config without its weights: from the reference, or the tiny entry's."""
    from transformers import AutoConfig

    from ..causal_lm import tiny_config

    if spec.reference is not None:
        return AutoConfig.from_pretrained(spec.reference)
    return tiny_config(tokenizer_of(spec), spec.family, **spec.tiny)


def _check_models(recipe: GraftRecipe) -> None:
    """Layer, position, family and tokenizers checked on the configs, before any model is built."""
    from ..models.configuration_grafted_causal_lm import GraftedCausalLMConfig

    donor, host = (recipe.models[role] for role in ("donor", "host"))
    donor_config, host_config = _config(donor), _config(host)
    layer, layers = recipe.specialise["layer"], donor_config.num_hidden_layers
    if layer >= layers:
        raise HfGraftError(f"recipe: specialise.layer {layer} is outside the donor, which has blocks 0..{layers - 1}.")
    graft = {"position": recipe.graft["position"], "donor_config": donor_config.to_dict(), "donor_layer": layer,
             "translator_init": recipe.graft["translator_init"]}
    try:
        GraftedCausalLMConfig(host_config=host_config.to_dict(), grafts=[graft])
    except ValueError as error:
        raise HfGraftError(f"recipe: graft: {error}") from error
    if tokenizer_of(donor).get_vocab() != tokenizer_of(host).get_vocab():
        raise HfGraftError("recipe: models: the donor and the host have different tokenizers; a grafted block reads "
                           "and writes the host's token positions, so both must share one vocabulary.")


def _task(recipe: GraftRecipe):
    from ..data import modular_addition

    return modular_addition(recipe.task["modulus"], train_size=recipe.task["train_size"], test_size=recipe.task["test_size"])


def run(recipe: GraftRecipe, *, progress: bool = True) -> dict:
    """Run a checked layer-grafting recipe end to end; return its report (also ``report.json``)."""
    import torch

    from ..safetensors_io import atomic_write_json

    job = Job(recipe, progress, STEPS)
    job.say("models", ", ".join(f"{role}: {spec.reference or 'tiny ' + spec.family}" for role, spec in recipe.models.items()))
    donor, tokenizer = recipe_model(job, recipe.models["donor"])
    host, _ = recipe_model(job, recipe.models["host"])
    task = _task(recipe)
    torch.manual_seed(recipe.seed)

    models_record = {role: spec.describe() for role, spec in recipe.models.items()}
    specialise_record = {"models": models_record, "task": recipe.task, "specialise": recipe.specialise, "seed": recipe.seed}
    tuned, _ = _step(
        job, "specialise", specialise_record, tokenizer,
        f"LoRA on block {recipe.specialise['layer']} of the donor only, modular addition n={recipe.task['modulus']}",
        lambda: (_specialise(recipe, donor, tokenizer, task, job.progress), {}),
    )
    graft_record = {"specialised": specialise_record, "graft": recipe.graft}
    grafted, done = _step(
        job, "graft", graft_record, tokenizer,
        f"block {recipe.specialise['layer']} after the host's first {recipe.graft['position']} blocks, "
        f"{recipe.graft['strategy']} strategy, {recipe.graft['loss']} loss on {recipe.graft['data']} data",
        lambda: _graft(recipe, donor, tuned, host, tokenizer, task, job.progress),
    )

    job.say("evaluation", f"{recipe.evaluation['samples']} task prompts, {recipe.evaluation['text_prompts']} text prompts")
    models = {"tuned": tuned, "grafted": grafted, "host": host, "vanilla": donor}
    scores = {name: _scores(recipe, model, tokenizer, task) for name, model in models.items()}
    report = {"output_dir": str(job.out), "grafted": str(job.out / STEP_FOLDERS["graft"]),
              "translator_losses": done["losses"], "scores": scores}
    openness = grafted.config.grafts[0].get("openness")
    if openness is not None:
        report["gate"] = {"loss": done.get("gate_loss"), "openness": openness}
        job.say("evaluation", "gate open on {:.0%} of task tokens (mean {:.3f}), {:.0%} of general-text tokens (mean {:.3f})".format(
            openness["task"]["open_share"], openness["task"]["mean"], openness["general"]["open_share"], openness["general"]["mean"]))
    if job.progress:
        from ..reporting import markdown_table

        metrics = list(scores["grafted"])
        print(markdown_table([{"metric": m, **{name: scores[name][m] for name in models}} for m in metrics]))
    if recipe.push_to_hub:
        report["pushed"] = str(grafted.push_to_hub(recipe.push_to_hub, tokenizer=tokenizer))
        job.say("evaluation", f"pushed to {report['pushed']}")
    atomic_write_json(job.out / "report.json", report)
    return report


def _step(job, step: str, record: dict, tokenizer, message: str, build) -> tuple[Any, dict]:
    """The model a step saved under ``<output_dir>/<folder>``, made by ``build()`` (a model and what
    else to record, e.g. losses) unless a finished one from the same ``record`` is there."""

    directory = job.out / STEP_FOLDERS[step]
    if job.done(directory, record):
        job.say(step, f"done earlier, loading {directory}")
    else:
        job.say(step, message)
        model, extra = build()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        job.finish(directory, record, **extra)
    return load_model(directory)[0], json.loads((directory / MARKER).read_text(encoding="utf-8"))


def _specialise(recipe: GraftRecipe, donor, tokenizer, task, progress: bool):
    from ..causal_lm import Schedule
    from ..layers.specialise import specialise_block

    settings = recipe.specialise
    schedule = Schedule(steps=settings["steps"], batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
                        warmup_steps=min(20, settings["steps"] // 10), seed=recipe.seed)
    return specialise_block(donor, settings["layer"], task, tokenizer=tokenizer, rank=settings["rank"], schedule=schedule,
                            progress=progress)


def _graft(recipe: GraftRecipe, donor, tuned, host, tokenizer, task, progress: bool) -> tuple[Any, dict]:
    from ..data import pydoc_corpus
    from ..layers.gating import record_openness, train_gate
    from ..layers.translators import fit_translators, train_translators, translator_batches
    from ..models.modeling_grafted_causal_lm import GraftedModelForCausalLM

    settings = recipe.graft
    source = tuned if settings["strategy"] == "direct" else donor
    grafted = GraftedModelForCausalLM.from_models(
        host, source, donor_layer=recipe.specialise["layer"], position=settings["position"],
        translator_init=settings["translator_init"], donor_name=recipe.models["donor"].reference or "tiny donor",
        gate=settings["gate"],
    )
    data = translator_batches(tokenizer, settings["data"], task=task, corpus=pydoc_corpus().train,
                              batches=settings["batches"], seed=recipe.seed)
    if settings["translator_init"] == "least_squares":
        fit_translators(grafted, donor=source, host=host, data=data, ridge=settings["ridge"])
    losses = {}
    if settings["stages"]:
        losses = train_translators(grafted, donor=source, host=host, data=data, loss=settings["loss"],
                                   stages=settings["stages"], steps=settings["steps"],
                                   learning_rate=settings["learning_rate"], seed=recipe.seed, progress=progress)
    if settings["strategy"] == "original":
        grafted.swap_block(tuned)
    extra = {"losses": losses}
    if settings["gate"]:
        task_ids = translator_batches(tokenizer, "task", task=task, batches=settings["batches"], seed=recipe.seed)
        general_ids = translator_batches(tokenizer, "corpus", corpus=pydoc_corpus().train, batches=settings["batches"],
                                         seed=recipe.seed)
        extra["gate_loss"] = train_gate(grafted, task_data=task_ids, general_data=general_ids, steps=settings["gate_steps"],
                                        seed=recipe.seed, progress=progress)
        record_openness(grafted, task_ids, general_ids)
    grafted.config.graft_dataset = f"{settings['data']} (modular addition n={recipe.task['modulus']}, pydoc corpus)"
    return grafted, extra


def _scores(recipe: GraftRecipe, model, tokenizer, task) -> dict:
    from ..causal_lm import encode_text
    from ..data import pydoc_corpus
    from ..layers.evaluation import language_scores, task_scores, text_prompts

    settings = recipe.evaluation
    held_out = pydoc_corpus().held_out
    scores = task_scores(model, tokenizer, task.test[: settings["samples"]])
    prompts = text_prompts(tokenizer, held_out, count=settings["text_prompts"], seed=recipe.seed)
    scores.update(language_scores(model, tokenizer, prompts, held_out_ids=encode_text(tokenizer, held_out),
                                  mlm=settings["mlm"], top_k=settings["top_k"]))
    return scores

