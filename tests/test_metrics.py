"""The shipped evaluate modules load offline and compute the right numbers on known inputs."""

import socket
from pathlib import Path

import pytest
import torch

from hf_graft import metrics
from hf_graft.errors import HfGraftError


REFERENCES = [0, 1, 2, 0, 1, 2]
PREDICTIONS = [0, 1, 1, 2, 1, 0]  # correct at positions 0, 1 and 4
WEIGHTS = [0.5, 2, 0.7, 0.5, 9, 0.4]  # correct weight 11.5 of 13.1

DONOR_PARAMS = 16_880_201  # the paper's VGG16 donor
GRAFTED_PARAMS = 1_934_665  # the paper's grafted model


def load(name):
    """Load a module keeping its data in memory, so tests write no cache files."""
    return metrics.load(name, keep_in_memory=True)


def test_available_lists_the_shipped_modules_each_with_a_card():
    assert metrics.available() == [
        "accuracy",
        "exact_match",
        "factual",
        "format_hard",
        "format_soft",
        "lexical_perplexity",
        "mlm_predictability",
        "model_footprint",
        "perplexity",
    ]
    package_dir = Path(metrics.__file__).parent
    for name in metrics.available():
        assert (package_dir / name / "README.md").is_file()
        assert not (package_dir / name / "__init__.py").exists()


def test_load_never_opens_a_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert metrics.load("accuracy").compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}
    assert metrics.load("model_footprint").compute(numel=[4], bits=[8])["bytes"] == 4.0


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(HfGraftError, match="Unknown hf-graft metric 'acc'.*accuracy, exact_match, factual"):
        metrics.load("acc")
    with pytest.raises(ValueError):
        metrics.load("../accuracy")


def test_accuracy_of_a_hand_made_example():
    assert load("accuracy").compute(predictions=PREDICTIONS, references=REFERENCES) == {"accuracy": 0.5}


def test_accuracy_unnormalized_is_the_count_of_correct_predictions():
    result = load("accuracy").compute(predictions=PREDICTIONS, references=REFERENCES, normalize=False)
    assert result == {"accuracy": 3.0}


def test_accuracy_with_sample_weights():
    accuracy = load("accuracy")
    weighted = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, sample_weight=WEIGHTS)
    assert weighted["accuracy"] == pytest.approx(11.5 / 13.1)
    count = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, sample_weight=WEIGHTS, normalize=False)
    assert count["accuracy"] == pytest.approx(11.5)
    with pytest.raises(ValueError, match="one weight per example"):
        accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, sample_weight=[1.0, 2.0])


def test_footprint_of_mixed_bit_widths():
    result = load("model_footprint").compute(numel=[1000, 24, 1024], bits=[8, 32, 2.5])
    assert result == {"parameters": 2048, "bytes": 1000 + 96 + 320.0, "megabytes": 1416 / 2**20}


def test_footprint_reproduces_the_paper_sizes():
    footprint = load("model_footprint")
    donor = footprint.compute(numel=[DONOR_PARAMS], bits=[32])
    grafted = footprint.compute(numel=[GRAFTED_PARAMS], bits=[32], reference_bytes=donor["bytes"])
    assert donor["parameters"] == DONOR_PARAMS
    assert round(donor["megabytes"], 2) == 64.39
    assert round(grafted["megabytes"], 2) == 7.38
    assert round(grafted["reduction_percent"], 2) == 88.54
    assert grafted["size_ratio"] == pytest.approx(DONOR_PARAMS / GRAFTED_PARAMS)
    assert "size_ratio" not in donor and "reduction_percent" not in donor


def test_footprint_rejects_invalid_sizes():
    footprint = load("model_footprint")
    with pytest.raises(ValueError, match="bits must be > 0"):
        footprint.compute(numel=[10], bits=[0])
    with pytest.raises(ValueError, match="reference_bytes must be > 0"):
        footprint.compute(numel=[10], bits=[32], reference_bytes=0)


def test_footprint_of_a_torch_module():
    linear = torch.nn.Linear(10, 5)
    assert metrics.footprint(linear) == {"parameters": 55, "bytes": 220.0, "megabytes": 220 / 2**20}
    assert metrics.footprint(linear, bits=8)["bytes"] == 55.0
    halved = metrics.footprint(linear, reference_bytes=440)
    assert halved["size_ratio"] == 2.0 and halved["reduction_percent"] == 50.0


def test_footprint_bits_from_dtype_and_shared_parameters():
    linear = torch.nn.Linear(10, 5).to(torch.bfloat16)
    assert metrics.footprint(linear, bits=None)["bytes"] == 110.0
    assert metrics.footprint(linear.state_dict(), bits=None)["bytes"] == 110.0
    tied = torch.nn.Sequential(linear, linear)
    assert metrics.footprint(tied)["parameters"] == 55


def test_footprint_rejects_what_it_cannot_measure():
    with pytest.raises(HfGraftError, match="not tensors: \\['step'\\]"):
        metrics.footprint({"weight": torch.zeros(3), "step": 7})
    with pytest.raises(HfGraftError, match="without tensors"):
        metrics.footprint(torch.nn.ReLU())
    with pytest.raises(HfGraftError, match="got list"):
        metrics.footprint([torch.zeros(3)])
