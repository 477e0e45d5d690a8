"""What every recipe kind shares: checking a parsed recipe, its model entries, and the job that runs it.

A :class:`Job` writes each finished step under the recipe's ``output_dir`` with a record of what
made it (:data:`MARKER`), so a rerun of the same recipe resumes after the last finished step and a
folder written by a different recipe is refused. Model entries (:func:`model_spec`) are a folder
or Hub id, or a tiny model built offline (:func:`recipe_model` builds it once and saves it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import HfGraftError
from ..safetensors_io import atomic_write_json

__all__ = [
    "MARKER",
    "Job",
    "ModelSpec",
    "check_keys",
    "check_reference",
    "corpus_tokenizer",
    "dataclass_settings",
    "load_model",
    "model_spec",
    "read_yaml",
    "recipe_model",
    "tokenizer_of",
]

MARKER = "hf_graft_step.json"
_TINY_KEYS = ("tiny", "family", "vocab_size", "seed", "pretrain", "finetune")
_TINY_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
_SCHEDULE_KEYS = ("steps", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm", "seed")


@dataclass
class ModelSpec:
    """One model of a recipe: a folder or Hub id (``reference``), or a tiny model built offline."""

    role: str
    reference: str | None = None
    tiny: dict | None = None
    family: str = "llama"
    vocab_size: int = 320
    seed: int = 0
    pretrain: dict | None = None
    finetune: dict | None = None

    def describe(self) -> dict:
        """What identifies the model, for the record beside its outputs."""
        return dataclasses.asdict(self)


def check_keys(where: str, mapping: Any, allowed, required=()) -> dict:
    """``mapping`` itself, checked to be a mapping with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(mapping, dict):
        raise HfGraftError(f"recipe: {where} must be a mapping, got {type(mapping).__name__}.")
    unknown = [key for key in mapping if key not in allowed]
    if unknown:
        raise HfGraftError(
            f"recipe: unknown key {where + '.' if where else ''}{unknown[0]} (allowed here: {', '.join(allowed)})."
        )
    missing = [key for key in required if key not in mapping]
    if missing:
        raise HfGraftError(f"recipe: {where + '.' if where else ''}{missing[0]} is required.")
    return mapping


def dataclass_settings(where: str, cls, values: Any):
    """``cls(**values)``, its fields checked as recipe keys; its own errors prefixed with ``where``."""
    values = {} if values is None else values
    check_keys(where, values, [f.name for f in dataclasses.fields(cls)])
    try:
        return cls(**values)
    except HfGraftError as error:
        raise HfGraftError(f"recipe: {where}: {error}") from error


def model_spec(role: str, entry: Any) -> ModelSpec:
    """The model entry ``models.<role>`` checked: a folder or Hub id, ``{path: ...}``, or ``{tiny: {...}, ...}``."""
    where = f"models.{role}"
    if isinstance(entry, str) and entry:
        return ModelSpec(role=role, reference=entry)
    if isinstance(entry, dict) and "path" in entry:
        check_keys(where, entry, ("path",))
        return model_spec(role, entry["path"])
    if not isinstance(entry, dict) or "tiny" not in entry:
        raise HfGraftError(
            f"recipe: {where} must be a model folder or Hub id, {{path: ...}}, or {{tiny: {{...}}, ...}}; got {entry!r}."
        )
    check_keys(where, entry, _TINY_KEYS)
    check_keys(f"{where}.tiny", entry["tiny"] or {}, _TINY_CONFIG_KEYS)
    for part in ("pretrain", "finetune"):
        if entry.get(part) is not None:
            keys = _SCHEDULE_KEYS + (("seq_len",) if part == "pretrain" else ())
            check_keys(f"{where}.{part}", entry[part], keys, required=("steps",))
    from ..causal_lm import TINY_FAMILIES

    family = entry.get("family", "llama")
    if family not in TINY_FAMILIES:
        raise HfGraftError(f"recipe: {where}.family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}.")
    return ModelSpec(
        role=role,
        tiny=dict(entry["tiny"] or {}),
        family=family,
        vocab_size=entry.get("vocab_size", 320),
        seed=entry.get("seed", 0),
        pretrain=entry.get("pretrain"),
        finetune=entry.get("finetune"),
    )


def check_reference(spec: ModelSpec) -> None:
    """Fail now, not after training, when a model folder or Hub id cannot be found."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec.reference)
    except (OSError, ValueError) as error:
        raise HfGraftError(
            f"recipe: models.{spec.role}: cannot find the model {spec.reference!r} (a folder with config.json, "
            f"or a Hub id reachable from here): {str(error).splitlines()[0]}"
        ) from error


def read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML file (``safe_load``: plain data only)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as error:
        raise HfGraftError(f"Cannot read the recipe {path}: {error}") from error
    except yaml.YAMLError as error:
        raise HfGraftError(f"The recipe {path} is not valid YAML: {error}") from error


@functools.cache
def corpus_tokenizer(vocab_size: int):
    """The offline byte-level BPE tokenizer trained on the embedded pydoc text (one per size)."""
    from .. import data

    return data.corpus_tokenizer(vocab_size)


def tokenizer_of(spec: ModelSpec):
    """The tokenizer of a model entry, without loading the model."""
    from transformers import AutoTokenizer

    if spec.tiny is not None:
        return corpus_tokenizer(spec.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(spec.reference)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Job:
    """The state of one recipe run: where it writes, which process it is, how it reports."""

    def __init__(self, recipe, progress: bool, steps: list[str]):
        from accelerate import PartialState

        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.state = PartialState()
        self.progress = progress and self.state.is_main_process
        self.steps = steps

    def say(self, step: str, message: str) -> None:
        if self.progress:
            index = self.steps.index(step) + 1
            print(f"[{index}/{len(self.steps)}] {step}: {message}", flush=True)

    def done(self, directory: Path, record: dict) -> bool:
        """Whether ``directory`` holds a finished step made from ``record``; refuses one made otherwise."""
        marker = directory / MARKER
        if not marker.is_file():
            return False
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved.get("record") != json.loads(json.dumps(record)):
            raise HfGraftError(
                f"{directory} was written by a different recipe (or an earlier version of this one). "
                "Choose another output_dir, or delete that folder to redo the step."
            )
        return True

    def finish(self, directory: Path, record: dict, **extra) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / MARKER, {"record": record, **extra})

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (and writes its outputs); then the others."""
        with self.state.main_process_first():
            yield


def build_tiny(job: Job, spec: ModelSpec, finetune_examples: Optional[list] = None):
    """Build (and pretrain, and fine-tune on ``finetune_examples``) a tiny model as its entry says."""
    import torch

    from ..causal_lm import Schedule, build_causal_lm, encode_text, finetune, pretrain, tiny_config
    from ..data import pydoc_corpus

    tokenizer = corpus_tokenizer(spec.vocab_size)
    model = build_causal_lm(tiny_config(tokenizer, spec.family, **spec.tiny), seed=spec.seed)
    if spec.pretrain:
        settings = dict(spec.pretrain)
        seq_len = settings.pop("seq_len", 64)
        text = encode_text(tokenizer, pydoc_corpus().train)
        pretrain(model, text, Schedule(**{"batch_size": 16, "learning_rate": 3e-3, **settings}), seq_len=seq_len, progress=job.progress)
    if spec.finetune:
        schedule = Schedule(**{"batch_size": 32, "learning_rate": 3e-3, **spec.finetune})
        finetune(model, tokenizer, finetune_examples, schedule, progress=job.progress)
    torch.manual_seed(job.recipe.seed)
    return model.eval(), tokenizer


def load_model(directory_or_id):
    """A causal LM and its tokenizer (given a pad token when it has none), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory_or_id).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory_or_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def recipe_model(job: Job, spec: ModelSpec, finetune_examples: Optional[list] = None, finetune_record: Any = None):
    """A recipe model: loaded from its reference, or built once and then loaded from the output dir.

    A tiny model's ``finetune`` runs on ``finetune_examples``; ``finetune_record`` (what they are
    made from) joins the record that a rerun must match.
    """
    if spec.reference is not None:
        return load_model(spec.reference)
    directory = job.out / "models" / spec.role
    record = spec.describe() | {"task": finetune_record if spec.finetune else None}
    with job.main_first():
        if not job.done(directory, record):
            job.say("models", f"building the tiny {spec.role}")
            model, tokenizer = build_tiny(job, spec, finetune_examples)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            job.finish(directory, record)
    return load_model(directory)


