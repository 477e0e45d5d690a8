"""Static merges of several SkillPacks into one set of weights: the baselines a router is compared with.

Task arithmetic, TIES and DARE (linear or TIES-style) through peft's merge utilities
(``peft.utils.merge_utils``), applied per module to the packs' decoded deltas. A module that only
some packs change gets zeros for the others, so every method sees the same tensors.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from peft.utils import merge_utils
from torch import nn

from ..errors import HfGraftError
from .files import read_skillpack
from .model import base_fingerprint

__all__ = ["MERGE_METHODS", "merge_skillpacks"]

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def merge_skillpacks(
    base_model: nn.Module,
    packs: Sequence | Mapping,
    *,
    method: str = "task_arithmetic",
    weights: Optional[Sequence[float]] = None,
    density: float = 0.5,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``base_model`` with the packs' deltas merged by ``method`` into its weights.

    ``weights`` scale each pack (default 1 each); ``density`` is the kept fraction of TIES and
    DARE; ``seed`` fixes DARE's random drop. Packs must be for this base.
    """
    if method not in MERGE_METHODS:
        raise HfGraftError(f"method must be one of {MERGE_METHODS}, got {method!r}.")
    paths = list(packs.values()) if isinstance(packs, Mapping) else list(packs)
    if not paths:
        raise HfGraftError("merge_skillpacks needs at least one SkillPack.")
    files = [read_skillpack(path) for path in paths]
    for path, pack in zip(paths, files):
        if base_fingerprint(base_model, pack.config.module_specs) != pack.config.base_fingerprint:
            raise HfGraftError(f"SkillPack {os.fspath(path)!r} was extracted from another base model.")
    scale = torch.tensor(list(weights) if weights is not None else [1.0] * len(files), dtype=torch.float32)
    if len(scale) != len(files):
        raise HfGraftError(f"{len(files)} packs but {len(scale)} weights.")
    merged = copy.deepcopy(base_model)
    modules = dict(merged.named_modules())
    keys = sorted({(module, part) for pack in files for module, parts in pack.deltas.items() for part in parts})
    torch.manual_seed(seed)  # DARE drops entries at random
    with torch.no_grad():
        for module, part in keys:
            parameter = getattr(modules[module], part)
            deltas = [
                pack.deltas[module][part].delta() if part in pack.deltas.get(module, {}) else torch.zeros(parameter.shape)
                for pack in files
            ]
            if method == "task_arithmetic":
                combined = merge_utils.task_arithmetic(deltas, scale)
            else:
                combined = getattr(merge_utils, method)(deltas, scale, density)
            parameter += combined.to(parameter.dtype)
            for head, source in _tied_heads(files, module):
                if getattr(modules[head], "weight", None) is not parameter:
                    modules[head].weight += combined.to(parameter.dtype)
    return merged.eval()


def _tied_heads(files, module):
    return {(head, source) for pack in files for head, source in pack.config.tied_modules.items() if source == module}
