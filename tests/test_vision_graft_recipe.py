"""``kind: vision_graft`` recipes: checked up front, run end to end (export, push), resumed."""

import json
import importlib.util

import pytest
import yaml
from huggingface_hub import HfApi
from transformers import AutoModelForImageClassification

from hf_graft_cli import main as cli_main
from hf_graft.errors import HfGraftError
from hf_graft.recipes import load_recipe, run_recipe

HAS_EXPORT = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("onnxruntime") is not None
SMALL = {"preset": "paper", "donor_name": "resnet10t", "scion_cut": "layer1", "head_widths": [32], "donor_head_widths": [32], "image_size": 16}


def _recipe(tmp_path, **changes):
    recipe = {
        "kind": "vision_graft",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "graft": dict(SMALL),
        "data": {"dataset": "digits", "limit": 120},
        "training": {"donor": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3},
                     "graft": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3}},
        "export": {"int8": True, "calibration_samples": 32} if HAS_EXPORT else False,
    }
    recipe.update(changes)
    return recipe


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grafting": {}}, "unknown key grafting"),
        ({"graft": {**SMALL, "donor_name": "vgg61"}}, "recipe: graft: donor_name='vgg61' is not a timm model name"),
        ({"graft": {**SMALL, "scion_cut": "layer9"}}, "recipe: graft: .*layer9"),
        ({"graft": {**SMALL, "widths": [3]}}, "unknown key graft.widths"),
        ({"training": {"graft": {"epochs": 0}}}, "training.graft: epochs and batch_size must be at least 1"),
        ({"training": {"graft": {"epochz": 1}}}, "unknown key training.graft.epochz"),
        ({"data": {"dataset": "/nonexistent/images"}}, "data.dataset '/nonexistent/images' is neither"),
        ({"data": {"limit": 0}}, "data.limit must be a positive number"),
        ({"donor": {"checkpoint": "/nonexistent/donor"}}, "donor.checkpoint '/nonexistent/donor' is not a donor folder"),
        ({"export": {"int4": True}}, "unknown key export.int4"),
    ],
)
def test_vision_recipe_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(HfGraftError, match=message):
        load_recipe(_recipe(tmp_path, **change))
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.skipif(HAS_EXPORT, reason="checks the error given without the export extra")
def test_export_without_the_extra_is_refused_up_front(tmp_path):
    with pytest.raises(HfGraftError, match="export needs the export extra"):
        load_recipe(_recipe(tmp_path, export={"int8": False}))


def test_vision_recipe_end_to_end_push_then_resume(tmp_path, capsys, hub, repo_id):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, push_to_hub=repo_id)))
    assert cli_main(["run", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "[1/3] data: digits: 120 / 120 / 120 images, 10 labels" in shown and "| grafted |" in shown
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    donor_row, graft_row = report["rows"]
    assert graft_row["params"] < donor_row["params"]
    grafted = AutoModelForImageClassification.from_pretrained(out / "grafted")
    assert grafted.config.graft_metrics["test_accuracy"] == pytest.approx(graft_row["test_accuracy"])
    assert grafted.config.donor_name == "resnet10t" and grafted.config.num_labels == 10
    files = set(HfApi().list_repo_files(repo_id))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    if HAS_EXPORT:
        assert report["export"]["fp32"]["max_abs_diff"] <= report["export"]["fp32"]["atol"]
        assert 0.0 <= report["export"]["comparison"]["top1_agreement"] <= 1.0
        assert {"onnx/model.onnx", "onnx/model_int8.onnx", "onnx/config.json"} <= files
        assert "onnx/hf_graft_step.json" not in files

    again = run_recipe(_recipe(tmp_path))
    shown = capsys.readouterr().out
    assert shown.count("done earlier") == (2 if HAS_EXPORT else 1)
    assert again["rows"] == report["rows"]
    with pytest.raises(HfGraftError, match="different recipe"):
        run_recipe(_recipe(tmp_path, training={"donor": {"epochs": 1}, "graft": {"epochs": 1}}))
