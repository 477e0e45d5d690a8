"""Calibration the tuned model writes itself: what a SkillPack is measured on when no data is given.

A fine-tune's skill shows in what it writes. :func:`generated_calibration` samples sequences from
the tuned model, token by token from its start token (no tokenizer needed), and marks the tokens
where it departs from the base: those whose probability under the tuned model is at least
:data:`DEPARTURE` times their probability under the base. Their log-ratio is a one-sample estimate
of the two models' KL divergence at that position, so the marked tokens are where the fine-tune
changed what the model does. They become the batches' ``labels``: the next-token loss the pack is
measured and distilled on is taken there, as on a skill's supervised answers, while every token
still feeds each module's inputs.

For models larger than memory, :func:`checkpoint_calibration` loads each checkpoint in turn with
accelerate's big-model inference (``device_map="auto"``, layers that do not fit offloaded to disk).
Samples made by any other engine can be saved with :func:`save_calibration` and passed as a file.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from ...errors import HfGraftError

__all__ = ["DEPARTURE", "checkpoint_calibration", "generated_calibration", "load_calibration", "save_calibration"]

#: How many times more likely under the tuned model than under the base a sampled token must be to
#: count as where the fine-tune departs from the base.
DEPARTURE = 2.0

#: Config fields that bound a model's context; samples are cut to it.
POSITIONS = ("max_position_embeddings", "n_positions")

#: Sequences sampled at once.
SAMPLING_BATCH = 32

#: What transformers calls a model's key-value cache, as an argument and an output: ``cache`` from
#: the line that renamed it, ``past_key_values`` before.
CACHE_ARGUMENT = "cache" if hasattr(ModelOutput, "_replace_old_cache_name") else "past_key_values"

#: Largest calibration file read, in bytes.
MAX_CALIBRATION_FILE = 1 << 30


def start_token(config) -> int:
    """The token a sample starts from: the model's bos token, else its eos token (which ends one
    document and so begins the next)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int) and value >= 0:
            return value
    raise HfGraftError(
        "The model's config names no bos, eos or pad token to start samples from: pass calibration=[input_ids, ...] "
        "(or calibration=None for a data-free pack)."
    )


@torch.no_grad()
def sample_sequences(model: nn.Module, samples: int, length: int, *, seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` sequences of ``length`` tokens (at most the model's context) sampled from ``model`` (temperature 1, past any eos),
    and each sampled token's log-probability under it (``[samples, length - 1]``)."""
    length = min([length, *(v for v in (getattr(model.config, name, None) for name in POSITIONS) if isinstance(v, int) and v > 0)])
    if samples < 1 or length < 2:
        raise HfGraftError(f"Sampling needs at least one sequence of two tokens, got {samples} x {length}.")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    start = start_token(model.config)
    was_training = model.training
    model.eval()
    sequences, log_probs = [], []
    try:
        with tqdm(total=samples * (length - 1), desc="Sampling calibration from the tuned model", unit="tok", disable=not progress) as bar:
            for first in range(0, samples, SAMPLING_BATCH):
                count = min(SAMPLING_BATCH, samples - first)
                ids = torch.full((count, 1), start, dtype=torch.long)
                scores, past = [], None
                for _ in range(length - 1):
                    step = ids[:, -1:] if past is not None else ids
                    output = model(input_ids=step.to(device), use_cache=True, **{CACHE_ARGUMENT: past})
                    past = getattr(output, CACHE_ARGUMENT)
                    step_log_probs = torch.log_softmax(output.logits[:, -1].float(), dim=-1).cpu()
                    token = torch.multinomial(step_log_probs.exp(), 1, generator=generator)
                    scores.append(step_log_probs.gather(1, token))
                    ids = torch.cat([ids, token], dim=1)
                    bar.update(count)
                sequences.append(ids)
                log_probs.append(torch.cat(scores, dim=1))
    finally:
        model.train(was_training)
    return torch.cat(sequences), torch.cat(log_probs)


@torch.no_grad()
def token_log_probs(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Each token's log-probability under ``model`` given the tokens before it (``[n, length - 1]``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    found = []
    try:
        for batch in ids.split(batch_size):
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            found.append(torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, batch[:, 1:, None].to(device))[..., 0].cpu())
    finally:
        model.train(was_training)
    return torch.cat(found)


def mark_departures(ids: torch.Tensor, tuned_log_probs: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
    """``labels`` for ``ids``: each token where the tuned model departs from the base (its log-ratio
    at least ``log DEPARTURE``), ``-100`` elsewhere; every sampled token when none departs."""
    departs = (tuned_log_probs - base_log_probs) >= math.log(DEPARTURE)
    if not bool(departs.any()):
        departs = torch.ones_like(departs)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = ids[:, 1:].masked_fill(~departs, -100)
    return labels


def _batches(ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 8) -> list[dict]:
    return [{"input_ids": i, "labels": l} for i, l in zip(ids.split(batch_size), labels.split(batch_size))]


def generated_calibration(
    tuned: nn.Module, base: nn.Module, samples: int = 128, length: int = 128, *, seed: int = 0, progress: bool = True
) -> list[dict]:
    """Calibration batches the tuned model writes: ``samples`` sampled sequences of ``length`` tokens,
    labelled where the tuned model departs from ``base`` (see the module's docs)."""
    ids, tuned_log_probs = sample_sequences(tuned, samples, length, seed=seed, progress=progress)
    return _batches(ids, mark_departures(ids, tuned_log_probs, token_log_probs(base, ids)))


@contextlib.contextmanager
def _offloaded(folder: str):
    """The checkpoint in ``folder`` loaded for inference, layers that do not fit in memory offloaded to disk."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="hf-graft-offload-") as offload:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="auto", offload_folder=offload)
        try:
            yield model.eval()
        finally:
            del model


def checkpoint_calibration(
    base_folder: str, tuned_folder: str, samples: int = 128, length: int = 128, *, seed: int = 0, progress: bool = True
) -> list[dict]:
    """:func:`generated_calibration` of two checkpoint folders, each loaded in turn with accelerate's
    big-model inference (the GPUs, then memory, then disk)."""
    with _offloaded(tuned_folder) as tuned:
        ids, tuned_log_probs = sample_sequences(tuned, samples, length, seed=seed, progress=progress)
    with _offloaded(base_folder) as base:
        base_log_probs = token_log_probs(base, ids)
    return _batches(ids, mark_departures(ids, tuned_log_probs, base_log_probs))


def save_calibration(path: str | os.PathLike, batches: Sequence[dict]) -> None:
    """Save calibration batches of one sequence length (``input_ids`` and, when every batch has
    them, ``labels``) to a safetensors file that ``calibration=path`` reads back."""
    if not batches:
        raise HfGraftError("There is no calibration batch to save.")
    tensors = {"input_ids": torch.cat([batch["input_ids"] for batch in batches]).to(torch.long).contiguous()}
    if all("labels" in batch for batch in batches):
        tensors["labels"] = torch.cat([batch["labels"] for batch in batches]).to(torch.long).contiguous()
    save_file(tensors, str(path), metadata={"format": "hf-graft-calibration"})


def load_calibration(path: str | os.PathLike, vocabulary: Optional[int] = None, batch_size: int = 8) -> list[dict]:
    """The batches of a calibration file written by :func:`save_calibration` (or any engine): a
    safetensors file holding ``input_ids`` ``[n, length]`` of integer token ids and optionally
    ``labels`` of the same shape (``-100`` where no loss is taken). Shapes, dtypes and ids are checked."""
    path = str(path)
    if not os.path.isfile(path):
        raise HfGraftError(f"No calibration file at {path}.")
    if os.path.getsize(path) > MAX_CALIBRATION_FILE:
        raise HfGraftError(f"{path} is larger than {MAX_CALIBRATION_FILE >> 20} MiB: not a calibration file.")
    try:
        with safe_open(path, framework="pt") as handle:
            names = set(handle.keys())
            if "input_ids" not in names or names - {"input_ids", "labels"}:
                raise HfGraftError(f"{path} must hold 'input_ids' and optionally 'labels', found {sorted(names)}.")
            tensors = {name: handle.get_tensor(name) for name in names}
    except HfGraftError:
        raise
    except Exception as error:  # safetensors' own parse errors
        raise HfGraftError(f"{path} is not a readable safetensors file: {error}") from None
    ids = tensors["input_ids"]
    integer = (torch.int64, torch.int32, torch.int16, torch.uint8)
    if ids.dtype not in integer or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise HfGraftError(f"{path}: input_ids must be an integer [sequences, tokens >= 2] tensor, got {ids.dtype} {tuple(ids.shape)}.")
    ids = ids.long()
    if int(ids.min()) < 0 or (vocabulary is not None and int(ids.max()) >= vocabulary):
        raise HfGraftError(f"{path}: token ids must lie in [0, {vocabulary}), found {int(ids.min())}..{int(ids.max())}.")
    labels = tensors.get("labels")
    if labels is None:
        return [{"input_ids": batch} for batch in ids.split(batch_size)]
    if labels.dtype not in integer or labels.shape != ids.shape:
        raise HfGraftError(f"{path}: labels must be integers shaped like input_ids {tuple(ids.shape)}, got {labels.dtype} {tuple(labels.shape)}.")
    labels = labels.long()
    if bool(((labels != -100) & (labels != ids)).any()):
        raise HfGraftError(f"{path}: each label must be its input id or -100.")
    return _batches(ids, labels, batch_size)
