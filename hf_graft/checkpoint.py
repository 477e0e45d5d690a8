"""Resumable training checkpoints in safetensors and JSON, with no pickle anywhere.

``accelerate``'s ``save_state`` and ``torch.save(optimizer.state_dict())`` pickle the optimizer
state, and unpickling a downloaded checkpoint can run arbitrary code. Here a checkpoint is a
directory of four files:

- ``model.safetensors``: ``model.state_dict()``;
- ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()``, keyed by its path in it
  (``state.{param_id}.{name}``, e.g. ``state.0.exp_avg``; ``param_groups.{i}.{key}`` for tensor
  hyper-parameters);
- ``rng.safetensors``: the torch CPU generator state (``torch_cpu``) and, when CUDA is in use,
  one per device (``torch_cuda.{i}``);
- ``trainer_state.json``: everything else: the optimizer's param groups and non-tensor state,
  the scheduler's ``state_dict()``, Python's and NumPy's RNG states, and the caller's ``state``.

Saving then loading and training on reproduces the uninterrupted run bit for bit. The directory
appears atomically: it is written under a temporary name beside its target and renamed into
place, so a crash leaves the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import HfGraftError
from .safetensors_io import atomic_write_text, fsync_directory, load_tensors, save_tensors

__all__ = ["load_training_state", "save_from_main", "save_training_state"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
_FORMAT = "hf-graft-training-state"
_VERSION = 1
_JSON_FIXES = {
    "state": "keep it to numbers, strings, booleans, None, lists and str-keyed dicts",
    "optimizer": "this optimizer keeps non-tensor state JSON cannot hold; use a torch.optim optimizer",
    "scheduler": (
        "use a scheduler whose state_dict() holds plain numbers (StepLR, CosineAnnealingLR, LinearLR, "
        "LambdaLR with plain functions), or save that scheduler yourself"
    ),
}


def save_training_state(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint of a training run to ``directory`` and return its path.

    ``state`` is the caller's own progress (epoch, step, best metric, ...); it must be
    JSON-serialisable and comes back from :func:`load_training_state` as JSON types. The current
    RNG states are saved too, so call this where training would continue. An existing checkpoint
    at ``directory`` is replaced; a directory that is not a checkpoint is never touched. Anything
    that cannot be stored without pickle (a scheduler with callable objects in its state, say)
    raises :class:`HfGraftError` before any file is written.
    """
    directory = Path(os.path.abspath(directory))  # so that "." has a name to stage beside
    _check_replaceable(directory)
    optimizer_tensors: dict[str, torch.Tensor] = {}
    trainer_state = {
        "format": _FORMAT,
        "version": _VERSION,
        "state": dict(state or {}),
        "optimizer": {
            "class": type(optimizer).__name__,
            "state_dict": _split_tensors(optimizer.state_dict(), "", optimizer_tensors),
        },
        "scheduler": None
        if scheduler is None
        else {"class": type(scheduler).__name__, "state_dict": scheduler.state_dict()},
        "rng": _python_numpy_rng_state(),
    }
    for part, fix in _JSON_FIXES.items():
        try:
            json.dumps(trainer_state[part])
        except (TypeError, ValueError) as e:
            raise HfGraftError(
                f"Cannot checkpoint the {part}: it is not JSON-serialisable ({e}); {fix}."
            ) from e
    text = json.dumps(trainer_state, indent=1) + "\n"

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(directory, "tmp")
    staging.mkdir()
    try:
        save_tensors(model.state_dict(), staging / MODEL_FILE)
        save_tensors(optimizer_tensors, staging / OPTIMIZER_FILE)
        save_tensors(_torch_rng_state(), staging / RNG_FILE)
        atomic_write_text(staging / STATE_FILE, text)
        fsync_directory(staging)
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def save_from_main(accelerator, directory, model, optimizer, scheduler=None, state: dict[str, Any] | None = None) -> None:
    """:func:`save_training_state` in an ``accelerate`` run: every process waits, the main one writes
    the unwrapped model, optimizer and scheduler, and every process waits again."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_training_state(
            directory,
            accelerator.unwrap_model(model),
            getattr(optimizer, "optimizer", optimizer),
            getattr(scheduler, "scheduler", scheduler),
            state=state,
        )
    accelerator.wait_for_everyone()


def load_training_state(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_training_state` and return the caller's ``state``.

    ``model``, ``optimizer`` and ``scheduler`` must be built as they were for the saved run (same
    architecture, same parameters in the same order, same optimizer and scheduler classes). The
    model's weights are checked name by name against its own state dict, and every file is
    validated before anything is changed, so a missing, corrupt or mismatched checkpoint raises
    :class:`HfGraftError` and leaves the model, optimizer, scheduler and RNGs as they were. A
    scheduler state in the checkpoint is ignored when ``scheduler`` is None.
    """
    directory = Path(directory)
    missing = [name for name in _FILES if not (directory / name).is_file()]
    if missing:
        raise HfGraftError(
            f"{directory} is not a complete training checkpoint (missing {', '.join(missing)}). "
            "Check the path, or write one with save_training_state()."
        )
    trainer_state = _read_trainer_state(directory / STATE_FILE)
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    model_tensors, _ = load_tensors(directory / MODEL_FILE, expected)
    optimizer_state = _optimizer_state(directory, trainer_state["optimizer"], optimizer)
    scheduler_state = _scheduler_state(directory, trainer_state["scheduler"], scheduler)
    rng_tensors = _torch_rng_tensors(directory / RNG_FILE)
    python_rng, numpy_rng = _python_numpy_rng(directory / STATE_FILE, trainer_state["rng"])

    model.load_state_dict(model_tensors)
    optimizer.load_state_dict(optimizer_state)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    torch.set_rng_state(rng_tensors["torch_cpu"])
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            if f"torch_cuda.{device}" in rng_tensors:
                torch.cuda.set_rng_state(rng_tensors[f"torch_cuda.{device}"], device)
    return trainer_state["state"]


def _sibling(directory: Path, kind: str) -> Path:
    """A fresh hidden name beside ``directory`` for staging a new checkpoint or retiring an old one."""
    return directory.with_name(f".{directory.name}.{kind}-{uuid.uuid4().hex[:12]}")


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier checkpoint."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise HfGraftError(f"{directory} exists and is not a directory; choose another checkpoint directory.")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / STATE_FILE).is_file():
        raise HfGraftError(
            f"{directory} exists and is not a training checkpoint; refusing to replace it. "
            "Choose another directory, or empty this one."
        )


def _move_into_place(staging: Path, directory: Path) -> None:
    """Rename the finished staging directory to ``directory``, replacing an earlier checkpoint.

    A directory cannot be renamed over a non-empty one, so the old checkpoint is first renamed
    aside and deleted only once the new one is in place.
    """
    retired = None
    if directory.exists():
        retired = _sibling(directory, "old")
        os.rename(directory, retired)
    os.rename(staging, directory)
    fsync_directory(directory.parent)
    if retired is not None:
        shutil.rmtree(retired)


def _split_tensors(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Return ``obj`` with each tensor replaced by None and stored in ``tensors`` under its dotted path.

    Dict keys become strings and tuples become lists, as JSON would make them.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return None
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{path}.{k}" if path else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, path: str, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """Invert :func:`_split_tensors`: put each tensor back at its path, recording the paths used."""
    if path in tensors:
        used.add(path)
        return tensors[path]
    if isinstance(obj, dict):
        return {k: _join_tensors(v, f"{path}.{k}" if path else k, tensors, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, f"{path}.{i}", tensors, used) for i, v in enumerate(obj)]
    return obj


def _corrupt(path: Path, problem: str) -> HfGraftError:
    return HfGraftError(
        f"The training checkpoint file {path} is corrupt: {problem}. Delete the checkpoint and train "
        "from an earlier one, or from scratch."
    )


def _read_trainer_state(path: Path) -> dict[str, Any]:
    """Parse ``trainer_state.json`` and check its top-level structure."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise _corrupt(path, f"not readable JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise _corrupt(path, f"no {_FORMAT!r} format marker")
    if data.get("version") != _VERSION:
        raise HfGraftError(
            f"{path} has checkpoint format version {data.get('version')!r}; this hf-graft reads version "
            f"{_VERSION}. Load it with the hf-graft version that wrote it."
        )
    shapes = {"state": dict, "optimizer": dict, "scheduler": (dict, type(None)), "rng": dict}
    for key, kind in shapes.items():
        if not isinstance(data.get(key), kind):
            raise _corrupt(path, f"{key!r} is missing or malformed")
    for key in ("optimizer", "scheduler"):
        entry = data[key]
        if entry is not None and not (
            isinstance(entry.get("class"), str) and isinstance(entry.get("state_dict"), dict)
        ):
            raise _corrupt(path, f"the {key} entry is malformed")
    return data


def _optimizer_state(
    directory: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Rebuild the saved optimizer state dict and check it fits ``optimizer``."""
    if saved["class"] != type(optimizer).__name__:
        raise HfGraftError(
            f"{directory} was saved with optimizer {saved['class']}, not {type(optimizer).__name__}. "
            f"Pass an optimizer of class {saved['class']} to resume from it."
        )
    tensors, _ = load_tensors(directory / OPTIMIZER_FILE)
    used: set[str] = set()
    state_dict = _join_tensors(saved["state_dict"], "", tensors, used)
    if used != set(tensors):
        unmatched = sorted(set(tensors) - used)[:5]
        raise _corrupt(directory / OPTIMIZER_FILE, f"tensors {unmatched} match nothing in {STATE_FILE}")
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not (
        isinstance(state, dict)
        and all(k.isdecimal() and isinstance(v, dict) for k, v in state.items())
        and isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and all(isinstance(p, int) for g in groups for p in g["params"])
    ):
        raise _corrupt(directory / STATE_FILE, "the optimizer state is malformed")
    live_groups = optimizer.state_dict()["param_groups"]
    saved_sizes, live_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in live_groups]
    if saved_sizes != live_sizes:
        raise HfGraftError(
            f"{directory} holds optimizer parameter groups of sizes {saved_sizes}, but this optimizer's are "
            f"{live_sizes}. Build the optimizer over the same parameters, in the same order, as the run "
            "that saved it."
        )
    state = {int(k): v for k, v in state.items()}
    if not set(state) <= {p for g in groups for p in g["params"]}:
        raise _corrupt(directory / STATE_FILE, "the optimizer state refers to parameters no group holds")
    for group, live in zip(groups, live_groups):
        for key, value in group.items():
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


def _scheduler_state(
    directory: Path, saved: dict[str, Any] | None, scheduler: torch.optim.lr_scheduler.LRScheduler | None
) -> dict[str, Any] | None:
    """Return the saved scheduler state after checking it belongs to ``scheduler``."""
    if scheduler is None:
        return None
    if saved is None:
        raise HfGraftError(
            f"{directory} holds no scheduler state; pass scheduler=None to resume from it, "
            "or checkpoint with the scheduler."
        )
    if saved["class"] != type(scheduler).__name__:
        raise HfGraftError(
            f"{directory} was saved with scheduler {saved['class']}, not {type(scheduler).__name__}. "
            f"Pass a scheduler of class {saved['class']} to resume from it."
        )
    return saved["state_dict"]


def _torch_rng_state() -> dict[str, torch.Tensor]:
    """The torch generator states: CPU always, CUDA devices when CUDA has been used."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"torch_cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _torch_rng_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load the saved torch generator states and check each is one a generator accepts."""
    tensors, _ = load_tensors(path)
    cuda = sorted(name for name in tensors if name != "torch_cpu")
    if "torch_cpu" not in tensors or cuda != sorted(f"torch_cuda.{i}" for i in range(len(cuda))):
        raise _corrupt(path, f"unexpected tensors {sorted(tensors)}")
    try:
        torch.Generator().set_state(tensors["torch_cpu"])
    except (RuntimeError, TypeError) as e:
        raise _corrupt(path, f"torch_cpu is not a generator state ({e})") from e
    if any(tensors[name].dtype != torch.uint8 or tensors[name].dim() != 1 for name in cuda):
        raise _corrupt(path, "a CUDA generator state is not a uint8 vector")
    return tensors


def _python_numpy_rng_state() -> dict[str, Any]:
    """Python's and NumPy's global RNG states as JSON lists."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
    }


def _python_numpy_rng(path: Path, saved: dict[str, Any]) -> tuple[tuple, tuple]:
    """Rebuild the saved Python and NumPy RNG states, trying each on a scratch generator first."""
    try:
        version, internal, gauss = saved["python"]
        python_state = (version, tuple(internal), gauss)
        random.Random().setstate(python_state)
        name, keys, position, has_gauss, cached_gaussian = saved["numpy"]
        numpy_state = (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
        np.random.RandomState().set_state(numpy_state)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise _corrupt(path, f"the saved RNG state is malformed ({e})") from e
    return python_state, numpy_state
