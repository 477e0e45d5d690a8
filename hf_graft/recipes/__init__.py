"""One YAML file runs a whole job: ``hf-graft run recipe.yaml``.

A recipe's ``kind`` says which, one module each:

- ``distill`` (the default, :mod:`.distill`): a skill distilled from a teacher into a target (trl
  SFT, DPO, logit distillation) and shipped as a SkillPack;
- ``layer_graft`` (:mod:`.layer_graft`): a specialised transformer block grafted into a host LM
  between trained translators;
- ``vision_graft`` (:mod:`.vision_graft`): a donor CNN's early layers grafted onto a small
  rootstock, trained with the donor's help and exported to ONNX.

:mod:`.common` holds what they share: key checks, model entries, and the job that records each
finished step so that a rerun resumes. Examples of each kind ship in
``hf_graft.hub_templates/recipes/``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..errors import HfGraftError
from ..lazy import lazy_exports
from .common import ModelSpec, read_yaml

__all__ = ["KINDS", "GraftRecipe", "ModelSpec", "Recipe", "VisionGraftRecipe", "load_recipe", "run_recipe"]

# The recipe classes, each imported with its kind's module on first use.
__getattr__, __dir__ = lazy_exports(__name__, {"Recipe": "distill", "GraftRecipe": "layer_graft", "VisionGraftRecipe": "vision_graft"})

#: Recipe kinds and the module of each.
KINDS = {"distill": "distill", "layer_graft": "layer_graft", "vision_graft": "vision_graft"}


def _kind_module(kind: Any):
    if kind not in KINDS:
        raise HfGraftError(f"recipe: kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    return importlib.import_module(f"{__name__}.{KINDS[kind]}")


def load_recipe(source: str | os.PathLike | dict, *, output_dir: str | None = None):
    """Read and check a recipe (a YAML file or an already parsed dict) without training anything.

    The first problem found (an unknown key, a missing model, a bad setting) raises
    :class:`~hf_graft.errors.HfGraftError` naming it. ``output_dir`` overrides the recipe's.
    Returns the kind's checked recipe (``distill.Recipe``, ``layer_graft.GraftRecipe``,
    ``vision_graft.VisionGraftRecipe``).
    """
    raw = source if isinstance(source, dict) else read_yaml(source)
    kind = raw.get("kind", "distill") if isinstance(raw, dict) else "distill"
    return _kind_module(kind).load(raw, output_dir=output_dir)


def run_recipe(source, *, output_dir: str | None = None, progress: bool = True) -> dict:
    """Run a recipe end to end and return its report (also ``<output_dir>/report.json``).

    ``source`` is a YAML file, a parsed dict, or a recipe :func:`load_recipe` returned.
    """
    if isinstance(source, (str, os.PathLike, dict)):
        recipe = load_recipe(source, output_dir=output_dir)
    else:
        recipe = source
    kind = recipe.raw.get("kind", "distill") if isinstance(recipe.raw, dict) else "distill"
    return _kind_module(kind).run(recipe, progress=progress)
