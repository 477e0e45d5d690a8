"""Trained models kept on disk with the settings that made them, reused only for the same settings.

Benchmarks and experiments train many small models; :func:`cached_model` saves each one in its
folder beside ``cache_settings.json`` (the settings, and what the training reported), and loads it
instead of training again when a later run asks with equal settings. A folder appears only
complete (written to a staging folder, then moved), so a run killed while saving leaves no model
that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from .safetensors_io import atomic_write_json

__all__ = ["SETTINGS_NAME", "cached_model"]

SETTINGS_NAME = "cache_settings.json"


def cached_model(
    folder: str | os.PathLike,
    settings: Any,
    build: Callable[[], tuple[Any, dict]],
    *,
    model_class=None,
    tokenizer=None,
) -> tuple[Any, dict, bool]:
    """``(model, info, cached)``: the model saved in ``folder`` for ``settings``, or ``build()``'s.

    ``settings`` is anything JSON can hold once dataclasses and other objects are written as
    ``str``; it is compared as saved. ``build()`` returns the model and a JSON-able dict about its
    training (``info``), both saved with ``tokenizer`` when given. ``model_class`` loads the cached
    model (default: ``AutoModelForCausalLM``), in eval mode.
    """
    folder = os.fspath(folder)
    settings = json.loads(json.dumps(settings, default=str))
    marker = os.path.join(folder, SETTINGS_NAME)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("settings") == settings:
            if model_class is None:
                from transformers import AutoModelForCausalLM as model_class
            return model_class.from_pretrained(folder).eval(), saved["info"], True
    model, info = build()
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_json(os.path.join(staging, SETTINGS_NAME), {"settings": settings, "info": info})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model, info, False
