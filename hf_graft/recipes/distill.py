"""Distillation recipes (``kind: distill``, the default): a skill distilled into a target, shipped as a SkillPack.

As a mergekit recipe, a file names everything: the teacher (source) and target models, the
prompts, the training stages, the SkillPack's budget, the evaluation and where to push. The job:

1. load (or, for ``tiny`` entries, build and train) the models;
2. the teacher answers the prompts (greedy);
3. the stages listed under ``stages``, in the order sft, dpo, logits, each from the last's model;
4. the SkillPack (tuned target - base target), its skill scores and retention
   (:func:`hf_graft.skillpack.record_evaluation`), saved under ``<output_dir>/skillpack``;
5. ``push_to_hub``, when a repo id is given.

A recipe::

    output_dir: runs/addition-skill     # everything the job writes goes here (relative to the cwd)
    seed: 0
    models:
      teacher: org/teacher-model        # a folder or Hub id; or a tiny model (below)
      target: org/target-model
      base: org/target-model            # the delta's base; defaults to the target as loaded
    prompts:                            # a list of strings, or one of:
      task: addition                    # addition | modular_addition (hf_graft.data), with
      task_args: {digits: 2}            # their keyword arguments; or
      # dataset: org/prompts            # a dataset (datasets.load_dataset) with
      # split: train                    # its split and
      # column: prompt                  # its prompt column (answer_column: the expected answers)
      limit: 1000                       # at most this many prompts
    generation: {max_new_tokens: 8, batch_size: 64}
    stages:                             # any of the three; settings as the dataclasses' fields
      sft: {steps: 200, batch_size: 16, learning_rate: 1.0e-3}          # SftSettings
      dpo: {steps: 20, batch_size: 8, learning_rate: 1.0e-4, beta: 0.1}  # DpoSettings
      logits: {steps: 100, batch_size: 16, checkpoint_every: 50}        # LogitSettings
    skillpack: {target_ratio: 16, calibration: task}   # SkillPackConfig fields; calibration: task
                                                       # (the distillation data, the default) | pydoc | none
    evaluation: {metric: exact_match, references: task}  # an hf_graft.metrics module; false: none
    push_to_hub: org/my-skillpack       # optional

A model entry may instead be a tiny Llama built offline, for demos and tests::

    {tiny: {hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4},  # tiny_llama_config
     vocab_size: 320,                   # its tokenizer: byte-level BPE on the embedded pydoc text
     seed: 0,
     pretrain: {steps: 200, batch_size: 16, learning_rate: 3.0e-3, seq_len: 64},  # on pydoc text
     finetune: {steps: 400, batch_size: 32, learning_rate: 3.0e-3}}  # on the task's train split

A tiny teacher fine-tuned on the task stands in for a large model that has the skill.

The whole recipe is checked before any model is trained: an unknown key, a missing model, an
empty prompt set, or logit distillation between models of different vocabularies raises one
:class:`HfGraftError` naming it. Every step's result is saved under ``output_dir`` with a record
of the recipe part that made it, so a rerun of the same recipe resumes where the last run stopped
(the logits stage from its last checkpoint; sft and dpo from their start), and a directory
written by a different recipe is refused instead of silently reused.

The same recipe runs on several processes with ``accelerate launch -m hf_graft.distill
recipe.yaml``: models, answers and the SkillPack are made once by the main process; the
training stages run on all of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..data import Example
from ..distill import DpoSettings, LogitSettings, SftSettings
from ..errors import HfGraftError
from ..safetensors_io import atomic_write_json
from .common import MARKER, Job, ModelSpec, check_keys, check_reference, dataclass_settings, load_model, model_spec, recipe_model, tokenizer_of

__all__ = ["Recipe", "load", "run"]

_SECTIONS = ("kind", "output_dir", "seed", "models", "prompts", "generation", "stages", "skillpack", "evaluation", "push_to_hub")
_ROLES = ("teacher", "target", "base")
_STAGES = {"sft": SftSettings, "dpo": DpoSettings, "logits": LogitSettings}
_TASKS = ("addition", "modular_addition")
_SKILLPACK_KEYS = (
    "target_ratio", "byte_budget", "sparse_modules", "target_modules", "calibration", "calibration_samples",
    "calibration_length", "distill_steps", "distill_learning_rate", "objective", "formats", "compensation",
)
_CALIBRATION = ("none", "task", "pydoc")
_TEXT_METRICS = ("exact_match", "format_hard", "format_soft", "factual")


@dataclass
class Recipe:
    """A validated recipe (see the module docstring); build it with :func:`load_recipe`."""

    output_dir: str
    models: dict[str, ModelSpec]
    prompts: list[str]
    references: list[str] | None
    eval_examples: list[Example] | None
    task_train: list[Example] | None
    stages: dict[str, Any]
    seed: int = 0
    generation: dict = field(default_factory=dict)
    skillpack: dict = field(default_factory=dict)
    evaluation: dict | None = None
    push_to_hub: str | None = None
    raw: dict = field(default_factory=dict)


def _prompts(section: Any) -> tuple[list[str], list[str] | None, list[Example] | None, list[Example] | None]:
    """Prompts, their expected answers if known, held-out examples and the task's train split."""
    if isinstance(section, list):
        return section, None, None, None
    check_keys("prompts", section, ("task", "task_args", "dataset", "split", "column", "answer_column", "limit"))
    if ("task" in section) == ("dataset" in section):
        raise HfGraftError("recipe: prompts needs exactly one of task (a hf_graft.data task) and dataset, or a list.")
    limit = section.get("limit")
    if "task" in section:
        if section["task"] not in _TASKS:
            raise HfGraftError(f"recipe: prompts.task must be one of {', '.join(_TASKS)}, got {section['task']!r}.")
        from .. import data

        task = getattr(data, section["task"])(**(section.get("task_args") or {}))
        train = task.train[:limit]
        return [p for p, _ in train], [a for _, a in train], task.test, train
    import datasets

    column = section.get("column", "prompt")
    try:
        dataset = datasets.load_dataset(section["dataset"], split=section.get("split", "train"))
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise HfGraftError(f"recipe: prompts.dataset: cannot load {section['dataset']!r}: {error}") from error
    for name in (column, section.get("answer_column")):
        if name is not None and name not in dataset.column_names:
            raise HfGraftError(f"recipe: prompts: dataset {section['dataset']!r} has no column {name!r} ({dataset.column_names}).")
    rows = dataset[:limit] if limit else dataset[:]
    answers = rows[section["answer_column"]] if section.get("answer_column") else None
    train = list(zip(rows[column], answers)) if answers is not None else None
    return list(rows[column]), answers, None, train


def load(raw: dict, *, output_dir: str | None = None) -> Recipe:
    """Check a parsed distillation recipe without training anything.

    Model folders and Hub ids are looked up (their configs only), the prompt set is built, and
    the stage, SkillPack and evaluation settings are checked; the first problem found raises
    :class:`HfGraftError` naming the key. ``output_dir`` overrides the recipe's.
    """
    check_keys("", raw, _SECTIONS, required=("models", "prompts", "stages"))
    output_dir = output_dir or raw.get("output_dir")
    if not output_dir:
        raise HfGraftError("recipe: output_dir is required (or pass --out).")

    check_keys("models", raw["models"], _ROLES, required=("teacher", "target"))
    models = {role: model_spec(role, entry) for role, entry in raw["models"].items()}

    prompts, references, eval_examples, task_train = _prompts(raw["prompts"])
    from ..distill import check_prompts

    try:
        prompts = check_prompts(prompts)
    except HfGraftError as error:
        raise HfGraftError(f"recipe: prompts: {error}") from error

    stages_raw = raw["stages"] or {}
    check_keys("stages", stages_raw, tuple(_STAGES))
    if not stages_raw:
        raise HfGraftError(f"recipe: stages must name at least one of {', '.join(_STAGES)}.")
    stages = {name: dataclass_settings(f"stages.{name}", _STAGES[name], stages_raw[name]) for name in _STAGES if name in stages_raw}

    generation = check_keys("generation", raw.get("generation") or {}, ("max_new_tokens", "batch_size"))
    skillpack = dict(check_keys("skillpack", raw.get("skillpack") or {}, _SKILLPACK_KEYS))
    if skillpack.get("calibration", "task") not in _CALIBRATION:
        raise HfGraftError(f"recipe: skillpack.calibration must be one of {', '.join(_CALIBRATION)}, got {skillpack['calibration']!r}.")
    from ..skillpack import SkillPackConfig

    try:
        SkillPackConfig(**{k: v for k, v in skillpack.items() if k not in ("calibration", "calibration_length")})
    except (TypeError, ValueError) as error:
        raise HfGraftError(f"recipe: skillpack: {error}") from error

    evaluation = raw.get("evaluation", {})
    if evaluation is not False and evaluation is not None:
        check_keys("evaluation", evaluation, ("metric", "references"))
        evaluation = {"metric": "exact_match", "references": "task" if eval_examples else "teacher", **evaluation}
        if evaluation["metric"] not in _TEXT_METRICS:
            raise HfGraftError(f"recipe: evaluation.metric must be one of {', '.join(_TEXT_METRICS)}, got {evaluation['metric']!r}.")
        if evaluation["references"] not in ("task", "teacher"):
            raise HfGraftError(f"recipe: evaluation.references must be task or teacher, got {evaluation['references']!r}.")
        if evaluation["references"] == "task" and not eval_examples:
            raise HfGraftError("recipe: evaluation.references: task needs prompts.task (a task with a test split).")
    else:
        evaluation = None

    for spec in models.values():
        if spec.finetune is not None and task_train is None:
            raise HfGraftError(
                f"recipe: models.{spec.role}.finetune needs prompts with answers (prompts.task, or answer_column)."
            )
        if spec.reference is not None:
            check_reference(spec)
    recipe = Recipe(
        output_dir=str(output_dir),
        models=models,
        prompts=prompts,
        references=references,
        eval_examples=eval_examples,
        task_train=task_train,
        stages=stages,
        seed=raw.get("seed", 0),
        generation=dict(generation),
        skillpack=skillpack,
        evaluation=evaluation,
        push_to_hub=raw.get("push_to_hub"),
        raw=raw,
    )
    if "logits" in stages:
        _check_shared_tokenizer(recipe)
    return recipe


def _check_shared_tokenizer(recipe: Recipe) -> None:
    """Logit distillation compares distributions token by token: teacher and target need one vocabulary."""
    teacher, target = recipe.models["teacher"], recipe.models["target"]
    if teacher.tiny is not None and target.tiny is not None:
        same = teacher.vocab_size == target.vocab_size
    else:
        same = tokenizer_of(teacher).get_vocab() == tokenizer_of(target).get_vocab()
    if not same:
        raise HfGraftError(
            "recipe: stages.logits needs a teacher and a target with one vocabulary, and these tokenizers differ. "
            "Drop the logits stage (sft and dpo work across tokenizers) or pick models that share a tokenizer."
        )


def _answers(job: Job, name: str, model, tokenizer, prompts: list[str], record: dict, step: str) -> list[Example]:
    """Greedy answers of ``model``, computed once by the main process and kept as JSON."""
    from ..distill import model_answers

    directory = job.out / name
    with job.main_first():
        if not job.done(directory, record):
            job.say(step, f"{len(prompts)} prompts")
            answers = model_answers(
                model,
                tokenizer,
                prompts,
                max_new_tokens=_max_new_tokens(job, tokenizer),
                batch_size=job.recipe.generation.get("batch_size", 64),
                progress=job.progress,
            )
            job.finish(directory, record, answers=answers)
    return [tuple(pair) for pair in json.loads((directory / MARKER).read_text(encoding="utf-8"))["answers"]]


def _max_new_tokens(job: Job, tokenizer) -> int:
    """The recipe's ``generation.max_new_tokens``; by default one past the longest known answer, else 32."""
    if "max_new_tokens" in job.recipe.generation:
        return job.recipe.generation["max_new_tokens"]
    known = list(job.recipe.references or []) + [a for _, a in job.recipe.eval_examples or []]
    if not known:
        return 32
    return max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in known) + 1


def _stage_record(job: Job, name: str, before: dict) -> dict:
    settings = job.recipe.stages[name]
    return {"stage": name, "settings": dataclasses.asdict(settings), "before": before}


def _described(settings) -> str:
    """A stage's settings as one short line: the fields that differ from their defaults, steps always."""
    import dataclasses

    defaults = type(settings)()
    fields = [f.name for f in dataclasses.fields(settings)]
    shown = [name for name in fields if name == "steps" or getattr(settings, name) != getattr(defaults, name)]
    return ", ".join(f"{name.replace('_', ' ')} {getattr(settings, name):g}" if isinstance(getattr(settings, name), float)
                     else f"{name.replace('_', ' ')} {getattr(settings, name)}" for name in shown)


def _run_stage(job: Job, name: str, student, tokenizer, teacher, answers, record: dict):
    """Train ``student`` with stage ``name`` unless a finished run of it is saved; return the model."""
    from ..distill import distill_logits, dpo, preference_pairs, sft

    directory = job.out / "stages" / name
    settings = job.recipe.stages[name]
    if job.done(directory, record):
        job.say(name, f"done earlier, loading {directory / 'model'}")
        return load_model(directory / "model")[0]
    job.say(name, _described(settings))
    losses = []
    if name == "sft":
        result = sft(student, tokenizer, answers, settings, output_dir=str(directory / "trainer"), progress=job.progress)
    elif name == "dpo":
        own = _answers(job, "stages/dpo/own_answers", student, tokenizer, [p for p, _ in answers], record, name)
        pairs = preference_pairs(answers, own)
        job.say(name, f"{len(pairs)} of {len(answers)} answers differ from the teacher's")
        result = dpo(student, tokenizer, pairs, settings, output_dir=str(directory / "trainer"), progress=job.progress) if pairs else None
    else:
        result = distill_logits(teacher, student, tokenizer, answers, settings, output_dir=directory, progress=job.progress)
    if result is not None:
        student, losses = result.model, result.losses
    job.state.wait_for_everyone()
    if job.state.is_main_process:
        student.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
        job.finish(directory, record, losses=losses)
    job.state.wait_for_everyone()
    if losses:
        job.say(name, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return student


def _calibration(job: Job, tokenizer, answers):
    from ..causal_lm import task_batch

    kind = job.recipe.skillpack.get("calibration", "task")
    if kind == "task":  # the distillation examples, only their answers supervised
        return [task_batch(tokenizer, answers[start : start + 32]) for start in range(0, len(answers), 32)]
    if kind == "pydoc":
        from ..skillpack.extraction.calibration_data import calibration_batches, calibration_texts

        samples = job.recipe.skillpack.get("calibration_samples") or 64
        return calibration_batches(tokenizer, calibration_texts("pydoc"), samples, job.recipe.skillpack.get("calibration_length", 128))
    return None


def _score(model, tokenizer, examples: list[Example], metric: str) -> float:
    """``metric`` (an hf-graft evaluate module) of ``model``'s greedy answers against ``examples``' answers."""
    from .. import metrics
    from ..causal_lm import greedy_answers

    longest = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in examples)
    predictions = greedy_answers(model, tokenizer, [p for p, _ in examples], max_new_tokens=longest + 1)
    module = metrics.load(metric, keep_in_memory=True)
    features = module.features if isinstance(module.features, list) else [module.features]
    inputs = {"predictions": predictions}
    if any("references" in f for f in features):
        inputs["references"] = [answer for _, answer in examples]
    return float(module.compute(**inputs)[metric])


def run(recipe: Recipe, *, progress: bool = True) -> dict:
    """Run a checked distillation recipe end to end (see the module docstring) and return its report.

    The report (also written to ``<output_dir>/report.json``) holds every stage's losses, the
    SkillPack's measured size and error, the base / tuned / pack scores and the retention.
    """
    job = Job(recipe, progress, ["models", "teacher answers", *recipe.stages, "skillpack"])
    job.say("models", ", ".join(f"{role}: {spec.reference or 'tiny'}" for role, spec in recipe.models.items()))
    teacher, teacher_tokenizer = recipe_model(job, recipe.models["teacher"], recipe.task_train, recipe.raw["prompts"])
    student, tokenizer = recipe_model(job, recipe.models["target"], recipe.task_train, recipe.raw["prompts"])

    record = {"teacher": recipe.models["teacher"].describe(), "prompts": recipe.prompts, "generation": recipe.generation}
    answers = _answers(job, "teacher_answers", teacher, teacher_tokenizer, recipe.prompts, record, "teacher answers")
    before = record | {"target": recipe.models["target"].describe()}
    losses = {}
    for name in recipe.stages:
        stage_record = _stage_record(job, name, before)
        student = _run_stage(job, name, student, tokenizer, teacher, answers, stage_record)
        losses[name] = json.loads((job.out / "stages" / name / MARKER).read_text(encoding="utf-8"))["losses"]
        before = stage_record

    report = {
        "output_dir": str(job.out),
        "stages": {
            name: {"steps": recipe.stages[name].steps, "first_loss": logged[0] if logged else None, "last_loss": logged[-1] if logged else None}
            for name, logged in losses.items()
        },
    }
    if job.state.is_main_process:
        report.update(_skillpack(job, student, tokenizer, teacher, teacher_tokenizer, answers))
        atomic_write_json(job.out / "report.json", report)
    job.state.wait_for_everyone()
    return report


def _skillpack(job: Job, tuned, tokenizer, teacher, teacher_tokenizer, answers) -> dict:
    """Extract, evaluate, save and push the SkillPack; return its part of the report."""
    import torch

    from ..reporting import markdown_table
    from ..skillpack import SkillPackConfig, extract_skillpack, record_evaluation

    recipe = job.recipe
    base_spec = recipe.models.get("base", recipe.models["target"])  # the delta's base: the target as loaded by default
    base = recipe_model(job, base_spec, recipe.task_train, recipe.raw["prompts"])[0]
    settings = {k: v for k, v in recipe.skillpack.items() if k not in ("calibration", "calibration_length")}
    calibration = _calibration(job, tokenizer, answers)
    if calibration is not None:
        settings.setdefault("calibration_samples", sum(len(batch["input_ids"]) for batch in calibration))
    job.say("skillpack", "tuned target - base target, " + ", ".join(f"{key} {value}" for key, value in settings.items()))
    torch.manual_seed(recipe.seed)
    pack = extract_skillpack(base, tuned, SkillPackConfig(**settings), calibration=calibration, progress=job.progress)
    measured = pack.peft_config["default"].measured
    result: dict[str, Any] = {"skillpack": {k: measured.get(k) for k in ("stored_bytes", "compression_ratio", "relative_error")}}
    if recipe.evaluation is not None:
        metric = recipe.evaluation["metric"]
        if recipe.evaluation["references"] == "task":
            examples = recipe.eval_examples
        else:
            examples = list(zip(recipe.prompts, [a for _, a in answers]))
            if recipe.eval_examples:
                held_out = [p for p, _ in recipe.eval_examples]
                record = {"teacher": recipe.models["teacher"].describe(), "prompts": held_out, "generation": recipe.generation}
                examples = _answers(job, "teacher_answers_held_out", teacher, teacher_tokenizer, held_out, record, "skillpack")
        scores = {name: _score(model, tokenizer, examples, metric) for name, model in (("base", base), ("tuned", tuned), ("pack", pack))}
        dataset = "held-out task" if recipe.evaluation["references"] == "task" else "teacher's answers"
        retention = None
        if scores["tuned"] != scores["base"]:
            retention = record_evaluation(pack, metric, scores["base"], scores["tuned"], scores["pack"], dataset=dataset)
        result["evaluation"] = {"metric": metric, "references": dataset, **scores, "retention": retention}
        if job.progress:
            print(markdown_table([{"model": name, metric: f"{score:.4f}"} for name, score in scores.items()]))
            print(f"retention: {'undefined (tuned scores as the base)' if retention is None else f'{retention:.1%}'}")
    pack.save_pretrained(job.out / "skillpack")
    result["skillpack"]["path"] = str(job.out / "skillpack")
    job.say("skillpack", f"saved to {job.out / 'skillpack'}: {measured['stored_bytes']:,} bytes, "
            f"{measured['compression_ratio']:.1f}x smaller than the bf16 delta")
    if recipe.push_to_hub:
        result["pushed"] = str(pack.push_to_hub(recipe.push_to_hub))
        job.say("skillpack", f"pushed to {result['pushed']}")
    return result
