"""Trained models cached with the settings that made them (``hf_graft.model_cache``)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_graft.model_cache import SETTINGS_NAME, cached_model

CONFIG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _build(seed: int):
    def build():
        torch.manual_seed(seed)
        return LlamaForCausalLM(CONFIG), {"steps": seed}

    return build


def test_same_settings_load_the_saved_model_and_others_rebuild(tmp_path):
    folder = tmp_path / "models" / "tiny"
    first, info, cached = cached_model(folder, {"lr": 1e-3, "seed": 1}, _build(1))
    assert (info, cached) == ({"steps": 1}, False)
    again, info, cached = cached_model(folder, {"lr": 1e-3, "seed": 1}, _build(2))  # not built: loaded
    assert (info, cached) == ({"steps": 1}, True) and not again.training
    assert all(torch.equal(value, first.state_dict()[name]) for name, value in again.state_dict().items())
    other, info, cached = cached_model(folder, {"lr": 1e-3, "seed": 2}, _build(2))
    assert (info, cached) == ({"steps": 2}, False)
    assert json.loads((folder / SETTINGS_NAME).read_text())["settings"] == {"lr": 1e-3, "seed": 2}
    assert not torch.equal(other.model.embed_tokens.weight, first.model.embed_tokens.weight)


def test_a_failed_save_leaves_no_model_behind(tmp_path, monkeypatch):
    folder = tmp_path / "tiny"

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cached_model(folder, {"seed": 1}, _build(1))
    assert list(tmp_path.iterdir()) == []
