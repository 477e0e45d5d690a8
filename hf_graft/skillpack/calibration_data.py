"""Calibration data for SkillPack extraction: texts, and the token batches cut from them."""

import os

import torch

from ..errors import HfGraftError

__all__ = ["calibration_batches", "calibration_texts", "default_calibration"]

#: Sequences and tokens per sequence of the default calibration set (the embedded pydoc corpus).
DEFAULT_SAMPLES, DEFAULT_LENGTH = 128, 128


def calibration_texts(source: str, column: str = "text") -> list[str]:
    """Texts for calibration: the embedded pydoc corpus, a text file's paragraphs, or a Hub dataset's column."""
    if source == "pydoc":
        from ..data import pydoc_corpus

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
