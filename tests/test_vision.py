"""The feature-scion vision graft: exact paper sizes, Hub round trips, training, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

import hf_graft
from hf_graft import metrics
from hf_graft.errors import HfGraftError
from hf_graft.vision import (
    TrainingArguments,
    distillation_loss,
    donor_model,
    graft_vision,
    load_digits_splits,
    load_image_splits,
    train_classifier,
)

# A donor small enough to train in seconds; the graft code is the same for every timm CNN.
SMALL = dict(donor_name="resnet10t", scion_cut="layer1", head_widths=[32], donor_head_widths=[32], image_size=16)


def small_config(**overrides):
    return hf_graft.GraftedVisionConfig(**{**SMALL, "num_labels": 10, **overrides})


def test_paper_preset_has_the_papers_exact_sizes():
    config = hf_graft.GraftedVisionConfig.from_preset("paper", num_labels=9, image_size=128)
    grafted = hf_graft.GraftedModelForImageClassification(config)
    donor = donor_model(config)
    graft_size, donor_size = metrics.footprint(grafted), metrics.footprint(donor)
    assert graft_size["parameters"] == 1_934_665
    assert donor_size["parameters"] == 16_880_201
    assert round(graft_size["megabytes"], 2) == 7.38
    assert round(donor_size["megabytes"], 2) == 64.39
    reduction = metrics.footprint(grafted, reference_bytes=donor_size["bytes"])["reduction_percent"]
    assert round(reduction, 2) == 88.54


def test_timm_rootstock_features_are_concatenated_with_the_scion():
    config = hf_graft.GraftedVisionConfig.from_preset("paper-mobilenetv2", num_labels=9, image_size=64)
    model = hf_graft.GraftedModelForImageClassification(config).eval()
    rootstock_features = model.rootstock.num_features
    assert model.head.fc1.in_features == 256 + rootstock_features
    pixels = torch.randn(2, 3, 64, 64)
    features = model.pooled_features(pixels)
    assert features.shape == (2, 256 + rootstock_features)
    assert torch.equal(features[:, :256], model.scion(pixels).mean(dim=(2, 3)))
    assert model(pixels).logits.shape == (2, 9)


def test_rootstock_only_graft_has_no_donor_prefix():
    config = hf_graft.GraftedVisionConfig.from_preset("rootstock-only", num_labels=4, image_size=32)
    model = hf_graft.GraftedModelForImageClassification(config).eval()
    assert model.scion is None
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 4)


def test_from_donor_copies_the_scion_and_can_freeze_it():
    config = small_config(scion_trainable=False)
    donor = donor_model(config)
    grafted = hf_graft.GraftedModelForImageClassification.from_donor(donor, config)
    scion = grafted.scion.state_dict()
    assert scion and all(torch.equal(value, donor.body.state_dict()[key]) for key, value in scion.items())
    assert not any(p.requires_grad for p in grafted.scion.parameters())
    grafted.train()
    assert not grafted.scion.training and grafted.head.training


def test_save_and_auto_load_give_bit_identical_logits(tmp_path):
    model = hf_graft.GraftedModelForImageClassification(small_config(rootstock="mobilenetv2_035")).eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixels).logits
    model.save_pretrained(tmp_path)
    saved = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "README.md", "modeling_grafted_vision.py"} <= saved
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in saved)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    for auto_class in (AutoModelForImageClassification, AutoModel):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is hf_graft.GraftedModelForImageClassification
        with torch.no_grad():
            assert torch.equal(loaded(pixels).logits, expected)


def test_model_card_names_donor_sizes_and_metrics(tmp_path):
    config = small_config(graft_dataset="digits", graft_metrics={"test_accuracy": 0.9612})
    hf_graft.GraftedModelForImageClassification(config).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n")
    assert "library_name: transformers" in card and "- hf-graft" in card
    assert "`resnet10t`" in card and "test_accuracy" in card and "0.9612" in card
    assert "rootstock" not in card  # this graft has none


def test_push_to_hub_and_load_by_repo_id(hub, repo_id):
    from huggingface_hub import HfApi

    model = hf_graft.GraftedModelForImageClassification(small_config()).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixels).logits
    model.push_to_hub(repo_id, tags=["digits"])
    files = set(HfApi().list_repo_files(repo_id))
    assert {"model.safetensors", "config.json", "README.md", "modeling_grafted_vision.py"} <= files
    assert "- digits" in hub.files(repo_id)["README.md"].decode()
    loaded = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, expected)


def test_loads_with_trust_remote_code_where_hf_graft_is_absent(tmp_path):
    model = hf_graft.GraftedModelForImageClassification(small_config(rootstock="mobilenetv2_035")).eval()
    model.save_pretrained(tmp_path / "model")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixels).logits
    from safetensors.torch import save_file

    save_file({"pixels": pixels}, tmp_path / "pixels.safetensors")
    script = f"""
import sys
sys.modules["hf_graft"] = None  # the library cannot be imported in this process
from safetensors.torch import load_file, save_file
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("hf_graft"), type(model).__module__
with torch.no_grad():
    logits = model(load_file({str(tmp_path / "pixels.safetensors")!r})["pixels"]).logits
save_file({{"logits": logits}}, {str(tmp_path / "logits.safetensors")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], expected)


def test_distillation_loss_values():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p = torch.softmax(teacher / 2.0, -1)
    expected = float((p * (p.log() - torch.log(torch.tensor([0.5, 0.5])))).sum()) * 4.0
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def _digits_subset(config, size=120):
    splits = load_digits_splits(config)
    for name in ("train", "val", "test"):
        dataset = getattr(splits, name)
        dataset.images, dataset.labels = dataset.images[:size], dataset.labels[:size]
    return splits


def test_training_resumes_bit_exactly_after_a_kill(tmp_path, monkeypatch):
    import hf_graft.vision.training as training

    config = small_config()
    splits = _digits_subset(config)
    donor = donor_model(config)

    def run(folder):
        torch.manual_seed(0)
        model = hf_graft.GraftedModelForImageClassification.from_donor(donor, config)
        args = TrainingArguments(output_dir=str(folder), epochs=2, batch_size=32, learning_rate=1e-3)
        return model, train_classifier(model, splits.train, splits.val, args, teacher=donor)

    straight, history = run(tmp_path / "straight")

    save = training.save_from_main

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(training, "save_from_main", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(training, "save_from_main", save)
    resumed, resumed_history = run(tmp_path / "resumed")
    assert resumed_history == history
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_graft_vision_trains_donor_and_graft_and_reports(tmp_path):
    config = small_config()
    splits = _digits_subset(config, 300)
    fast = dict(output_dir="", epochs=4, batch_size=16, learning_rate=3e-3)
    result = graft_vision(
        config,
        str(tmp_path / "out"),
        dataset=splits,
        donor_args=TrainingArguments(**fast, distill_weight=0.0),
        graft_args=TrainingArguments(**fast),
    )
    donor_row, graft_row = result.rows
    assert graft_row["params"] < donor_row["params"]
    assert graft_row["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    for row in result.rows:
        assert row["train_val_gap"] == pytest.approx(row["train_accuracy"] - row["val_accuracy"])
    out = tmp_path / "out"
    assert (out / "report.md").read_text().count("|") > 20
    assert json.loads((out / "report.json").read_text())["rows"][1]["model"] == "grafted"
    reloaded = AutoModelForImageClassification.from_pretrained(out / "grafted")
    assert reloaded.config.graft_metrics["test_accuracy"] == pytest.approx(graft_row["test_accuracy"])
    assert reloaded.config.id2label[3] == "3"
    again = donor_model(config, checkpoint=str(out / "donor"))
    assert all(torch.equal(v, result.donor.state_dict()[k]) for k, v in again.state_dict().items())


# Bad input: one clear error each, nothing written.


def test_unknown_timm_name_is_refused_with_close_names():
    with pytest.raises(ValueError, match=r"donor_name='vgg61' is not a timm model name.*vgg"):
        hf_graft.GraftedVisionConfig(donor_name="vgg61")
    with pytest.raises(ValueError, match="rootstock='mobilenetv9' is not a timm model name"):
        hf_graft.GraftedVisionConfig(rootstock="mobilenetv9")


def test_cut_point_past_the_donor_depth_lists_the_cut_points():
    config = hf_graft.GraftedVisionConfig(scion_cut="features.40", num_labels=3)
    with pytest.raises(ValueError, match=r"scion_cut='features.40' is not a layer of vgg16, whose 31 cut points run features.0 \.\.\. features.30"):
        hf_graft.GraftedModelForImageClassification(config)


def test_donor_checkpoint_with_another_label_count_is_refused(tmp_path):
    donor_model(small_config(num_labels=5)).save_pretrained(str(tmp_path / "donor"))
    with pytest.raises(HfGraftError, match="has num_labels=5 but the graft config asks for 10"):
        donor_model(small_config(num_labels=10), checkpoint=str(tmp_path / "donor"))


def test_image_dataset_without_label_column_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "flat_images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"img{i}.png")
    with pytest.raises(HfGraftError, match="has no label column.*pass label_column="):
        load_image_splits(str(folder), small_config())


def test_image_folder_with_classes_loads(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (200 if label == "cat" else 0, i * 20, 0)).save(tmp_path / "imgs" / label / f"{i}.png")
    splits = load_image_splits(str(tmp_path / "imgs"), small_config(num_labels=2))
    assert splits.label_names == ["cat", "dog"]
    pixels, label = splits.train[0]
    assert pixels.shape == (3, 16, 16) and label in (0, 1)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20


def test_truncated_or_corrupt_weights_give_one_clear_error(tmp_path):
    hf_graft.GraftedModelForImageClassification(small_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"\xff" * 8 + data[8:]):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match="not a valid safetensors file.*truncated or corrupt"):
            AutoModelForImageClassification.from_pretrained(tmp_path)


def test_cli_bad_input_exits_with_one_message_and_writes_nothing(tmp_path, capsys):
    from hf_graft_cli import main

    out = tmp_path / "out"
    code = main(["vision", "train", "--out", str(out), "--scion-cut", "features.99", "--image-size", "32"])
    assert code == 2
    assert "scion_cut='features.99' is not a layer of vgg16" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["vision", "train"])  # --out is required: argparse's own usage error


def test_cli_eval_prints_accuracy_and_size_of_a_saved_graft(tmp_path, capsys):
    from hf_graft_cli import main

    hf_graft.GraftedModelForImageClassification(small_config()).save_pretrained(tmp_path / "graft")
    assert main(["vision", "eval", str(tmp_path / "graft"), "--dataset", "digits", "--split", "val"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and 0.0 <= report["accuracy"] <= 1.0
    assert report["params"] == metrics.footprint(hf_graft.GraftedModelForImageClassification(small_config()))["parameters"]


def _digit_images(count=4):
    """A few of scikit-learn's 8x8 digits as grey PIL images (values 0..16 scaled to 0..255)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    return [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L") for i in range(count)], digits


def test_saved_graft_has_an_image_processor_matching_the_training_transform(tmp_path):
    from transformers import AutoImageProcessor

    config = small_config(num_channels=1, image_mean=[0.5], image_std=[0.25])
    hf_graft.GraftedModelForImageClassification(config).save_pretrained(tmp_path)
    assert "preprocessor_config.json" in os.listdir(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_size"] == 16 and saved["image_mean"] == [0.5] and saved["image_std"] == [0.25]
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is hf_graft.GraftedImageProcessor
    images, digits = _digit_images()
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 1, 16, 16)
    import numpy as np

    grey = torch.tensor(np.stack([np.asarray(image) for image in images]), dtype=torch.float32)[:, None] / 255
    dataset = hf_graft.vision.data.TensorImageDataset(grey, torch.tensor(digits.target[:4]), 16, [0.5], [0.25])
    library = torch.stack([dataset[i][0] for i in range(4)])  # what training feeds the model
    assert (pixels - library).abs().max() < 1e-3


def test_image_classification_pipeline_from_the_folder(tmp_path):
    from transformers import pipeline

    config = small_config(num_channels=1, image_mean=[0.5], image_std=[0.25], id2label={i: f"digit {i}" for i in range(10)})
    model = hf_graft.GraftedModelForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    images, _ = _digit_images(2)
    classify = pipeline("image-classification", model=str(tmp_path))
    results = classify(images, top_k=3)
    processor = hf_graft.GraftedImageProcessor.from_model_config(config)
    with torch.no_grad():
        expected = model(processor(images)["pixel_values"]).logits.softmax(-1)
    for result, probabilities in zip(results, expected):
        top = probabilities.topk(3)
        assert [r["label"] for r in result] == [f"digit {i}" for i in top.indices.tolist()]
        assert [round(r["score"], 5) for r in result] == [round(v, 5) for v in top.values.tolist()]


def test_image_processor_and_pipeline_with_trust_remote_code_where_hf_graft_is_absent(tmp_path):
    config = small_config(num_channels=1, image_mean=[0.5], image_std=[0.25])
    model = hf_graft.GraftedModelForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "model")
    images, _ = _digit_images(1)
    images[0].save(tmp_path / "digit.png")
    with torch.no_grad():
        expected = model(hf_graft.GraftedImageProcessor.from_model_config(config)(images)["pixel_values"]).logits.softmax(-1)
    script = f"""
import sys, json
sys.modules["hf_graft"] = None
from transformers import AutoImageProcessor, pipeline
processor = AutoImageProcessor.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
assert not type(processor).__module__.startswith("hf_graft"), type(processor).__module__
classify = pipeline("image-classification", model={str(tmp_path / "model")!r}, trust_remote_code=True)
print(json.dumps(classify({str(tmp_path / "digit.png")!r}, top_k=1)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    top = json.loads(result.stdout.strip().splitlines()[-1])[0]
    assert abs(top["score"] - float(expected.max())) < 1e-4
