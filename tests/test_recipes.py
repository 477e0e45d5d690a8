"""YAML recipes (``hf-graft run``): validation up front, a tiny job end to end, resume, the CLI."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from hf_graft_cli import main as cli_main
from hf_graft.distill.__main__ import main as distill_main
from hf_graft.errors import HfGraftError
from hf_graft.recipes import load_recipe, run_recipe
from hf_graft.skillpack import read_skillpack

RECIPES = sorted((Path(__file__).resolve().parents[1] / "hub_templates" / "recipes").glob("*.yaml"))
TINY = {"tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}, "vocab_size": 300}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _recipe(tmp_path, **changes):
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "models": {
            "teacher": {**TINY, "seed": 1, "finetune": {"steps": 60, "batch_size": 16, "learning_rate": 1e-2}},
            "target": {**TINY, "seed": 2},
        },
        "prompts": {"task": "addition", "task_args": {"digits": 1, "train_size": 64, "test_size": 16, "test_fraction": 0.2}},
        "stages": {
            "sft": {"steps": 30, "batch_size": 16, "learning_rate": 1e-2},
            "dpo": {"steps": 4, "batch_size": 8, "learning_rate": 1e-3},
            "logits": {"steps": 4, "batch_size": 16, "learning_rate": 1e-3, "checkpoint_every": 2},
        },
        "skillpack": {"target_ratio": 4, "calibration": "task"},
        "evaluation": {"metric": "exact_match", "references": "teacher"},
    }
    recipe.update(changes)
    return recipe


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_example_recipes_are_valid(path):
    raw = yaml.safe_load(path.read_text())
    if raw.get("export") and importlib.util.find_spec("optimum") is None:  # the vision example exports
        with pytest.raises(HfGraftError, match="export needs the export extra"):
            load_recipe(path)
        return
    recipe = load_recipe(path)
    assert (recipe.prompts and recipe.stages) if recipe.raw.get("kind", "distill") == "distill" else recipe.graft


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stagse": {}}, "unknown key stagse"),
        ({"stages": {"sft": {"stpes": 3}}}, "unknown key stages.sft.stpes"),
        ({"stages": {"sft": {"steps": 0}}}, "stages.sft"),
        ({"stages": {"distil": {}}}, "unknown key stages.distil"),
        ({"models": {"teacher": "/nonexistent/teacher-model", "target": TINY}}, "models.teacher: cannot find the model"),
        ({"models": {"teacher": TINY}}, "models.target is required"),
        ({"models": {"teacher": {**TINY, "layers": 2}, "target": TINY}}, "unknown key models.teacher.layers"),
        ({"prompts": []}, "prompt set is empty"),
        ({"prompts": {"task": "multiplication"}}, "prompts.task must be one of"),
        ({"models": {"teacher": {**TINY, "vocab_size": 320}, "target": TINY}}, "stages.logits needs a teacher and a target with one vocabulary"),
        ({"skillpack": {"target_ratio": 4, "calibration": "web"}}, "skillpack.calibration"),
        ({"evaluation": {"metric": "bleu"}}, "evaluation.metric"),
        ({"prompts": ["1+1="], "evaluation": {"references": "task"}}, "needs prompts.task"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(HfGraftError, match=message):
        load_recipe(_recipe(tmp_path, **change))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_bad_recipe_file_through_both_entry_points(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, stagse={})))
    assert cli_main(["run", str(path)]) == 2
    assert "unknown key stagse" in capsys.readouterr().err
    assert distill_main([str(path)]) == 2
    (tmp_path / "broken.yaml").write_text("models: [")
    assert cli_main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_tiny_recipe_end_to_end_then_resume(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path)))
    assert cli_main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    shown = captured.out
    assert "[3/6] sft" in shown and "[6/6] skillpack" in shown
    # one readable line per step: no settings reprs, no trainer log dicts, no dataset-map bars
    assert "Settings(" not in shown and "{'loss'" not in shown + captured.err and "examples/s" not in captured.err
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"sft", "dpo", "logits"}
    assert report["stages"]["sft"]["last_loss"] < report["stages"]["sft"]["first_loss"]
    evaluation = report["evaluation"]
    assert evaluation["base"] == 0.0 and evaluation["tuned"] > 0.1  # agreement with the teacher on held-out prompts rose
    pack = read_skillpack(out / "skillpack")
    recorded = pack.config.measured["evaluation"]
    assert recorded["metric"] == "exact_match" and recorded["retention"] == pytest.approx(evaluation["retention"])
    assert pack.config.measured["compression_ratio"] == pytest.approx(4, rel=0.2)
    assert (out / "stages" / "logits" / "checkpoint" / "trainer_state.json").is_file()

    # A rerun resumes: every step is loaded, nothing is trained again.
    again = run_recipe(path)
    shown = capsys.readouterr().out
    assert shown.count("done earlier") == 3 and "building the tiny" not in shown
    assert again["stages"] == report["stages"] and again["evaluation"] == report["evaluation"]
    # The same output_dir with another recipe is refused, not silently reused.
    changed = _recipe(tmp_path, stages={"sft": {"steps": 31, "batch_size": 16, "learning_rate": 1e-2}})
    with pytest.raises(HfGraftError, match="different recipe"):
        run_recipe(changed)
