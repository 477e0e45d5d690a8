"""Calibration data for SkillPack extraction: texts, and the token batches cut from them."""

import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from ...errors import HfGraftError

logger = logging.getLogger(__name__)

__all__ = [
    "calibration_batches", "calibration_texts", "default_batches", "default_calibration", "general_perplexity", "limited_batches",
    "resolve_calibration",
]

#: Sequences and tokens per sequence of the default calibration set (the embedded pydoc corpus).
DEFAULT_SAMPLES, DEFAULT_LENGTH = 128, 128


def calibration_texts(source: str, column: str = "text") -> list[str]:
    """Texts for calibration: the embedded pydoc corpus, a text file's paragraphs, or a Hub dataset's column."""
    if source == "pydoc":
        from ...data import pydoc_corpus

        return pydoc_corpus().train.split("\n\n")
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            texts = [part.strip() for part in handle.read().split("\n\n") if part.strip()]
    else:
        import datasets

        dataset = datasets.load_dataset(source, split="train")
        if column not in dataset.column_names:
            raise HfGraftError(f"Dataset {source!r} has no column {column!r} (it has {dataset.column_names}).")
        texts = [text for text in dataset[column] if isinstance(text, str) and text.strip()]
    if not texts:
        raise HfGraftError(f"The calibration source {source!r} holds no text.")
    return texts


def calibration_batches(tokenizer, texts: list[str], samples: int, length: int, batch_size: int = 8) -> list:
    """``samples`` sequences of ``length`` tokens cut from the concatenated ``texts``, in batches."""
    if samples < 1 or length < 2:
        raise HfGraftError("--calibration-samples must be >= 1 and --calibration-length >= 2.")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    count = min(samples, len(ids) // length)
    if count == 0:
        raise HfGraftError(f"The calibration text holds {len(ids)} tokens, fewer than one sequence of {length}.")
    sequences = ids[: count * length].reshape(count, length).to(torch.long)
    return list(sequences.split(batch_size))


def default_calibration(tokenizer, samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH) -> list:
    """General text for calibration when none is given: windows of the embedded pydoc corpus."""
    return calibration_batches(tokenizer, calibration_texts("pydoc"), samples, length)


def limited_batches(calibration: Iterable[Any], limit: int) -> tuple[list, int]:
    """The calibration batches, cut to ``limit`` sequences when it is positive, and their sequence count."""
    batches, count = [], 0
    for batch in calibration:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.dim() in (1, 2) and ids.numel()):
            raise HfGraftError("Calibration batches must be non-empty LongTensors of input_ids (or dicts holding them).")
        if ids.dim() == 1:
            ids = ids[None]
            batch = {**batch, "input_ids": ids} if isinstance(batch, dict) else ids
        if limit and count + len(ids) > limit:
            keep = limit - count
            batch = {key: value[:keep] for key, value in batch.items()} if isinstance(batch, dict) else ids[:keep]
        batches.append(batch)
        count += len(batch["input_ids"] if isinstance(batch, dict) else batch)
        if limit and count >= limit:
            break
    if not batches:
        raise HfGraftError("The calibration set is empty: give at least one batch of input_ids.")
    return batches, count


#: Files of which one shows a tokenizer was saved in a model folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _tokenizer_of(model, tokenizer):
    """``tokenizer``, or the one saved beside ``model`` (loaded, or its folder), or ``None``."""
    if tokenizer is None:
        source = model if isinstance(model, str) else (
            getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        )
        saved = source and any(os.path.isfile(os.path.join(str(source), name)) for name in TOKENIZER_FILES)
        if saved:  # a folder of weights alone would get a tokenizer guessed from its model type
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError, KeyError):
                tokenizer = None
    return tokenizer


def default_batches(model, tokenizer, samples: int) -> Optional[list]:
    """Windows of the embedded corpus, tokenized with ``tokenizer`` or the one saved beside the base
    model (``model`` loaded, or its folder)."""
    tokenizer = _tokenizer_of(model, tokenizer)
    if tokenizer is None:
        logger.warning(
            "No tokenizer for the default calibration text: the SkillPack is extracted data-free (weight error). "
            "Pass tokenizer=... or calibration=[input_ids, ...] to compress by what the model computes."
        )
        return None
    return default_calibration(tokenizer, samples=samples or 128)


def _supervised(batch: dict) -> int:
    """Tokens the next-token loss of ``batch`` is taken on: its labelled ones, or every one."""
    labels = batch.get("labels")
    return int((labels != -100).sum()) if labels is not None else batch["input_ids"].numel()


#: Tokens of the embedded corpus' held-out text that general perplexity is measured on.
GENERAL_TOKENS = 32 * DEFAULT_LENGTH


def general_perplexity(models: dict, model, tokenizer) -> Optional[dict]:
    """Perplexity of each of ``models`` (``{"base": ..., "tuned": ..., "pack": ...}``) on general text:
    :data:`GENERAL_TOKENS` tokens of the embedded corpus' held-out part, which calibration never
    sees, tokenized with ``tokenizer`` or the one beside ``model``; ``None`` without a tokenizer."""
    tokenizer = _tokenizer_of(model, tokenizer)
    if tokenizer is None:
        return None
    from ...causal_lm import encode_text, perplexity
    from ...data import pydoc_corpus

    ids = encode_text(tokenizer, pydoc_corpus().held_out)[:GENERAL_TOKENS]
    if ids.numel() < DEFAULT_LENGTH:
        return None
    found = {name: round(float(perplexity(each, ids, seq_len=DEFAULT_LENGTH)["perplexity"]), 4) for name, each in models.items()}
    return {**found, "tokens": int(ids.numel() // DEFAULT_LENGTH * DEFAULT_LENGTH)}


#: The ``calibration`` names :func:`resolve_calibration` knows, besides batches, a file and ``None``.
CALIBRATION_NAMES = ("generate", "pydoc")


def resolve_calibration(
    calibration: Any, tokenizer, model, config, *, distill_steps: int, sampler: Optional[Callable[[int, int], list]] = None,
    vocabulary: Optional[int] = None,
) -> Optional[list[dict]]:
    """The calibration batches as dicts of model inputs, or ``None`` for a data-free pack.

    ``calibration`` is one of

    - ``"generate"``: sequences the tuned model writes, labelled where it departs from the base
      (``sampler(samples, length)``, see :mod:`.generated`);
    - ``"pydoc"``: the embedded corpus, tokenized with ``tokenizer`` or the one beside ``model`` (a
      loaded model or its folder; data-free, with a warning, when there is none);
    - the path of a ``.safetensors`` file of samples (:func:`~.generated.load_calibration`);
    - batches of ``input_ids`` (or dicts of model inputs, with ``labels`` where the skill's answers are);
    - ``None``: data-free.

    Batches that carry the skill (given, generated or read from a file) get general text mixed in
    when ``config.general_text`` is on: the embedded corpus, as many tokens as the skill's batches
    take their loss on, so the pack is measured and distilled on what the model does off the skill too.
    ``config.calibration_samples`` is set to the skill's sequences used, and an unset
    ``config.distill_steps`` to ``distill_steps`` (0 data-free).
    """
    if isinstance(calibration, os.PathLike) or (isinstance(calibration, str) and calibration not in CALIBRATION_NAMES):
        if not str(calibration).endswith(".safetensors"):
            raise HfGraftError(
                f"calibration must be 'generate', 'pydoc', a .safetensors file of samples, batches of input_ids or None, got {calibration!r}."
            )
        from .generated import load_calibration

        calibration = load_calibration(calibration, vocabulary)
    elif calibration == "generate":
        if sampler is None:
            raise HfGraftError("calibration='generate' needs the tuned model to sample from.")
        calibration = sampler(config.calibration_samples or DEFAULT_SAMPLES, DEFAULT_LENGTH)
    skill = calibration is not None and not isinstance(calibration, str)
    if calibration == "pydoc":
        calibration = default_batches(model, tokenizer, config.calibration_samples)
    if calibration is None:
        config.calibration_samples, config.distill_steps = 0, 0
        return None
    batches, config.calibration_samples = limited_batches(calibration, config.calibration_samples)
    config.distill_steps = distill_steps if config.distill_steps is None else config.distill_steps
    batches = [dict(batch) if isinstance(batch, dict) else {"input_ids": batch} for batch in batches]
    if skill and config.general_text:
        tokenizer = _tokenizer_of(model, tokenizer)
        if tokenizer is None:
            logger.info("No tokenizer for general text: the SkillPack is calibrated on the skill's batches alone. Pass tokenizer=... to mix it in.")
        else:
            count = math.ceil(sum(map(_supervised, batches)) / DEFAULT_LENGTH)
            try:
                batches += [{"input_ids": ids} for ids in default_calibration(tokenizer, samples=count)]
            except HfGraftError as error:
                logger.warning("No general text mixed into the calibration: %s", error)
    return batches
