"""hf-graft's metrics, shipped as local ``evaluate`` modules.

``evaluate.load("accuracy")`` downloads the module's script from the Hugging Face Hub, so it fails
wherever the Hub is unreachable, and the script it gets can change under a pinned install. The
metrics hf-graft reports therefore ship inside the package, one folder per module
(``hf_graft/metrics/<name>/<name>.py`` with its ``README.md`` metric card), and :func:`load`
hands ``evaluate.load`` the script's file path. evaluate loads a path to an existing ``.py`` file
as a local module without contacting the Hub, so no environment variable needs to be set. The
folders are plain scripts, not subpackages, exactly as evaluate expects them.

    >>> import torch
    >>> from hf_graft import metrics
    >>> metrics.load("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
    >>> metrics.footprint(torch.nn.Linear(10, 5))
    {'parameters': 55, 'bytes': 220.0, 'megabytes': 0.000209808349609375}
"""

import functools
from collections.abc import Mapping
from pathlib import Path

import evaluate
import torch

from ..errors import HfGraftError


_MODULES_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the metric modules shipped with hf-graft, sorted."""
    return sorted(path.parent.name for path in _MODULES_DIR.glob("*/*.py") if path.stem == path.parent.name)


def load(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the hf-graft metric module ``name`` with ``evaluate.load``, offline.

    ``kwargs`` go to ``evaluate.load`` unchanged (``keep_in_memory``, ``cache_dir``,
    ``experiment_id``, ``num_process``/``process_id`` for distributed evaluation, ...).
    Raises :class:`~hf_graft.errors.HfGraftError` naming the available modules when ``name`` is
    not one of them.
    """
    names = available()
    if name not in names:
        raise HfGraftError(
            f"Unknown hf-graft metric {name!r}. Available metrics: {', '.join(names)}. "
            "For a metric from the Hugging Face Hub, call evaluate.load() directly (it needs network access)."
        )
    return evaluate.load(str(_MODULES_DIR / name / f"{name}.py"), **kwargs)


@functools.cache
def cached(name: str) -> evaluate.EvaluationModule:
    """:func:`load` once per process, kept in memory: for loops that score many times."""
    return load(name, keep_in_memory=True)


def footprint(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    bits: float | None = 32,
    reference_bytes: float | None = None,
) -> dict:
    """Size of a model or state dict, measured by the ``model_footprint`` module.

    Args:
        model_or_state_dict: A ``torch.nn.Module``, whose parameters are counted (shared
            parameters once, buffers not at all), or a mapping of names to tensors, each entry
            counted (as a file holding those entries would store them).
        bits: Bits per element for every tensor; ``None`` takes each tensor's dtype width
            (32 for fp32, 16 for bf16, 8 for int8), i.e. the size the tensors have in memory now.
            The default, 32, is the fp32 size that the grafting papers report.
        reference_bytes: Size to compare with, e.g. ``footprint(donor)["bytes"]``; adds
            ``size_ratio`` and ``reduction_percent`` to the result.

    Returns:
        ``{"parameters", "bytes", "megabytes"}`` (megabytes in MiB), plus ``"size_ratio"`` and
        ``"reduction_percent"`` when ``reference_bytes`` is given.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        tensors = list(model_or_state_dict.parameters())
    elif isinstance(model_or_state_dict, Mapping):
        not_tensors = [key for key, value in model_or_state_dict.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise HfGraftError(
                f"footprint() needs a state dict of tensors, but these entries are not tensors: {not_tensors}. "
                "Pass model.state_dict() or a dict loaded with safetensors.torch.load_file()."
            )
        tensors = list(model_or_state_dict.values())
    else:
        raise HfGraftError(
            f"footprint() takes a torch.nn.Module or a state dict of tensors, got {type(model_or_state_dict).__name__}."
        )
    if not tensors:
        raise HfGraftError("footprint() got a model or state dict without tensors: there is nothing to measure.")
    measurement = load("model_footprint", keep_in_memory=True)
    return measurement.compute(
        numel=[tensor.numel() for tensor in tensors],
        bits=[tensor.dtype.itemsize * 8 if bits is None else bits for tensor in tensors],
        reference_bytes=reference_bytes,
    )
