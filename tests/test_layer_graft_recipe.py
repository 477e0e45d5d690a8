"""``kind: layer_graft`` recipes: checked whole before any training, a tiny experiment end to end, resume."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_graft_cli import main as cli_main
from hf_graft.errors import HfGraftError
from hf_graft.recipes import load_recipe, run_recipe

TINY = {"tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64},
        "family": "gpt_neox", "vocab_size": 300}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _recipe(tmp_path, **changes):
    recipe = {
        "kind": "layer_graft",
        "output_dir": str(tmp_path / "run"),
        "models": {
            "donor": {**TINY, "pretrain": {"steps": 10, "batch_size": 4, "seq_len": 32, "seed": 0}},
            "host": {**TINY, "pretrain": {"steps": 10, "batch_size": 4, "seq_len": 32, "seed": 1}},
        },
        "task": {"modulus": 4, "train_size": 64, "test_size": 8},
        "specialise": {"layer": 1, "steps": 12, "batch_size": 8, "learning_rate": 1e-2},
        "graft": {"position": 1, "translator_init": "least_squares", "batches": 4, "steps": 4},
        "evaluation": {"samples": 8, "text_prompts": 4},
    }
    recipe.update(changes)
    return recipe


def _graft(**changes):
    return {"position": 1, "translator_init": "least_squares", "batches": 4, "steps": 4, **changes}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "graft"}, "kind must be one of distill, layer_graft"),
        ({"grafts": {}}, "unknown key grafts"),
        ({"specialise": {"steps": 3}}, "specialise.layer is required"),
        ({"specialise": {"layer": 2}}, "specialise.layer 2 is outside the donor, which has blocks 0..1"),
        ({"graft": _graft(position=3)}, "position 3 is outside the host"),
        ({"graft": _graft(loss="mse")}, "graft.loss must be one of residual, residual_kl, logits"),
        ({"graft": _graft(stages=["middle"])}, "graft.stages must be a list of pre and/or post"),
        ({"graft": _graft(strategy="swap")}, "graft.strategy must be one of original, direct"),
        ({"graft": _graft(gate="yes")}, "graft.gate must be true or false"),
        ({"graft": _graft(gate=True, gate_steps=-1)}, "graft.gate_steps must be a non-negative integer"),
        ({"task": {"modulus": 1}}, "task.modulus must be at least 2"),
        ({"models": {"donor": "/nonexistent/donor", "host": TINY}}, "models.donor: cannot find the model"),
        ({"models": {"donor": TINY}}, "models.host is required"),
        ({"models": {"donor": {**TINY, "finetune": {"steps": 3}}, "host": TINY}}, "only the block named in specialise"),
        ({"models": {"donor": {**TINY, "family": "mamba"}, "host": TINY}}, "models.donor.family must be one of"),
        ({"models": {"donor": {**TINY, "vocab_size": 320}, "host": TINY}}, "different tokenizers"),
        ({"models": {"donor": TINY, "host": {**TINY, "tiny": {**TINY["tiny"], "hidden_size": 48}}},
          "graft": _graft(translator_init="identity")}, "identity"),
    ],
)
def test_graft_recipe_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(HfGraftError, match=message):
        load_recipe(_recipe(tmp_path, **change))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_graft_recipe_end_to_end_then_resume(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path)))
    assert cli_main(["run", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "[2/4] specialise" in shown and "[4/4] evaluation" in shown and "| format_soft |" in shown
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"tuned", "grafted", "host", "vanilla"}
    for scores in report["scores"].values():
        assert set(scores) == {"format_hard", "format_soft", "factual", "lexical_perplexity", "perplexity"}
        assert all(0.0 <= scores[m] <= 1.0 for m in ("format_hard", "format_soft", "factual"))
    assert set(report["translator_losses"]) == {"pre", "post"}

    grafted = AutoModelForCausalLM.from_pretrained(out / "grafted").eval()
    assert type(grafted).__name__ == "GraftedModelForCausalLM"
    assert grafted.host.config.num_hidden_layers == 3 and grafted.config.grafts[0]["position"] == 1
    tuned = AutoModelForCausalLM.from_pretrained(out / "specialised")
    block = grafted.graft_blocks[0].block  # the specialised block was swapped in: its weights, exactly
    for name, tensor in tuned.gpt_neox.layers[1].state_dict().items():
        assert torch.equal(block.state_dict()[name], tensor), name

    again = run_recipe(path)
    shown = capsys.readouterr().out
    assert shown.count("done earlier") == 2 and "building the tiny" not in shown
    assert json.dumps(again["scores"]) == json.dumps(report["scores"])  # NaN where a model wrote no words
    changed = _recipe(tmp_path, graft=_graft(steps=5))
    with pytest.raises(HfGraftError, match="different recipe"):
        run_recipe(changed)


def test_a_gated_graft_recipe_trains_the_gate_and_reports_its_openness(tmp_path, capsys):
    report = run_recipe(load_recipe(_recipe(tmp_path, graft=_graft(gate=True, gate_steps=6))))
    shown = capsys.readouterr().out
    openness = report["gate"]["openness"]
    assert set(openness) == {"task", "general"} and set(report["gate"]["loss"]) == {"first", "last"}
    for where in openness.values():
        assert 0.0 <= where["mean"] <= 1.0 and 0.0 <= where["open_share"] <= 1.0 and where["tokens"] > 0
    assert f"gate open on {openness['task']['open_share']:.0%} of task tokens" in shown
    folder = tmp_path / "run" / "grafted"
    grafted = AutoModelForCausalLM.from_pretrained(folder)
    assert grafted.config.grafts[0]["gate"] is True and grafted.config.grafts[0]["openness"] == openness
    assert grafted.graft_blocks[0].gate is not None
    assert "open on" in (folder / "README.md").read_text()
