"""Edge export of vision grafts: Optimum ONNX export checked in ONNX Runtime, static int8 (QDQ)."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

pytest.importorskip("optimum.exporters.onnx")

import onnx  # noqa: E402  (installed with optimum's exporter)

from hf_graft import GraftedModelForImageClassification, GraftedVisionConfig, HfGraftError  # noqa: E402
from hf_graft.vision import export  # noqa: E402

IMAGE_SIZE = 32


def small_graft(**overrides):
    torch.manual_seed(0)
    config = GraftedVisionConfig.from_preset("paper", num_labels=10, image_size=IMAGE_SIZE, **overrides)
    return GraftedModelForImageClassification(config).eval()


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as normalised 3-channel 32x32 images, and their labels."""
    data = load_digits()
    images = torch.tensor(data.images[:600], dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    config = GraftedVisionConfig.from_preset("paper", num_labels=10, image_size=IMAGE_SIZE)
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor(data.target[:600])


@pytest.fixture(scope="module")
def digits_graft(digits, tmp_path_factory):
    """A graft with the paper's scion (random weights) and a one-layer head fitted on digits,
    exported to ONNX.

    With random weights every image gets the same class, so int8 agreement would be trivially 1;
    the fitted head (about 0.8 held-out accuracy) gives real class margins to test against.
    """
    images, labels = digits
    model = small_graft(head_widths=[128])
    with torch.no_grad():
        features = model.pooled_features(images[:300])
    model.head.train()  # the head's batch norm learns the feature statistics
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(model.head(features), labels[:300])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    report = export.export_onnx(model, tmp_path_factory.mktemp("digits") / "onnx")
    return model, report


@pytest.mark.parametrize(
    ("overrides", "opset"), [({}, None), ({"rootstock": "mobilenetv2_050"}, 17)], ids=["paper", "mobilenetv2"]
)
def test_export_matches_pytorch_with_dynamic_batch(tmp_path, overrides, opset):
    model = small_graft(**overrides)
    report = export.export_onnx(model, tmp_path / "onnx", opset=opset)

    assert report["max_abs_diff"] <= 1e-4
    assert report["path"] == str(tmp_path / "onnx" / "model.onnx")
    assert report["bytes"] == (tmp_path / "onnx" / "model.onnx").stat().st_size
    assert report["opset"] == (opset or export.GraftedVisionOnnxConfig.DEFAULT_ONNX_OPSET)
    assert report["versions"]["optimum"] and report["versions"]["onnxruntime"]
    written = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert {"config.json", "model.onnx"} <= written  # an Optimum ONNX model folder
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no staging folder left behind
    session = export.onnx_session(report["path"], threads=1)
    (model_input,) = session.get_inputs()
    assert model_input.name == "pixel_values" and isinstance(model_input.shape[0], str)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 5):
        images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
        (logits,) = session.run(None, {"pixel_values": images.numpy()})
        with torch.no_grad():
            expected = model(pixel_values=images).logits.numpy()
        assert logits.shape == (batch, 10)
        assert np.abs(logits - expected).max() <= 1e-4


def test_export_folder_loads_with_optimum_onnxruntime(digits_graft, digits):
    ort_models = pytest.importorskip("optimum.onnxruntime")
    model, report = digits_graft
    images = digits[0][:3]
    ort_model = ort_models.ORTModelForImageClassification.from_pretrained(Path(report["path"]).parent)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    assert torch.allclose(ort_model(pixel_values=images).logits, expected, atol=1e-4)


def test_onnx_config_is_optimum_vision_config():
    from optimum.exporters.onnx.config import VisionOnnxConfig

    config = GraftedVisionConfig.from_preset("paper", num_labels=10, image_size=IMAGE_SIZE)
    onnx_config = export.GraftedVisionOnnxConfig(config, task="image-classification")
    assert isinstance(onnx_config, VisionOnnxConfig)
    assert pickle.loads(pickle.dumps(export.GraftedVisionOnnxConfig)) is export.GraftedVisionOnnxConfig
    assert onnx_config.generate_dummy_inputs(framework="pt")["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert onnx_config.outputs == {"logits": {0: "batch_size"}}


def test_int8_is_small_qdq_and_agrees_with_fp32(digits_graft, digits, tmp_path, caplog):
    images, labels = digits
    _, report = digits_graft
    with caplog.at_level("WARNING"):
        int8 = export.quantize_int8(report["path"], images[:100], tmp_path / "model.int8.onnx")
    assert not [r.getMessage() for r in caplog.records if "out-of-range" in r.getMessage()]  # a quiet export

    assert int8["bytes"] == (tmp_path / "model.int8.onnx").stat().st_size
    assert int8["bytes"] < 0.35 * report["bytes"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.int8.onnx"]
    op_types = {node.op_type for node in onnx.load(int8["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    comparison = export.compare_onnx(report["path"], int8["path"], images[300:500], labels[300:500])
    assert comparison["top1_agreement"] >= 0.9
    assert comparison["fp32_accuracy"] > 0.5  # the fitted head is far above chance (0.1)
    assert abs(comparison["int8_accuracy"] - comparison["fp32_accuracy"]) <= 0.1
    assert comparison["size_ratio"] == int8["bytes"] / report["bytes"]


def test_failed_validation_writes_nothing(tmp_path):
    with pytest.raises(HfGraftError, match=r"differ from PyTorch's by up to .* more than atol=-1"):
        export.export_onnx(small_graft(), tmp_path / "onnx", atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_images_of_the_wrong_size_are_refused(tmp_path):
    with pytest.raises(HfGraftError, match=r"\[N, 3, 32, 32\], got shape \(2, 3, 28, 28\)"):
        export.export_onnx(small_graft(), tmp_path / "onnx", validation_images=torch.zeros(2, 3, 28, 28))


def test_missing_optimum_names_the_export_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)
    with pytest.raises(HfGraftError, match=r'pip install "hf-graft\[export\]"'):
        export.export_onnx(small_graft(), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
