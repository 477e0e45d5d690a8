"""Pickle-free training checkpoints: bit-exact resume, atomic replacement and clear errors."""

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, StepLR

import hf_graft.checkpoint as checkpoint
from hf_graft.checkpoint import load_training_state, save_training_state
from hf_graft.errors import HfGraftError
from hf_graft.safetensors_io import load_tensors, save_tensors


def _model(seed: int, width: int = 16) -> nn.Module:
    """A small net with dropout (torch RNG) and batch norm (buffers), so both must be restored."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 1)
    )


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9, weight_decay=1e-3)


def _train(model, optimizer, scheduler, steps: int) -> None:
    """Steps whose batches draw on torch's, NumPy's and Python's RNGs, as real data pipelines do."""
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4)
        noise = torch.from_numpy(np.random.standard_normal((8, 1)).astype(np.float32))
        target = x.sum(dim=1, keepdim=True) * random.uniform(0.5, 1.5) + noise
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _decay(step):
    return 0.9**step


@pytest.mark.parametrize(
    ("make_optimizer", "make_scheduler"),
    [
        (_adamw, lambda opt: StepLR(opt, step_size=2, gamma=0.5)),
        (_adamw, lambda opt: CosineAnnealingLR(opt, T_max=10)),
        (_sgd, lambda opt: LinearLR(opt, start_factor=0.3, total_iters=4)),
        (_sgd, lambda opt: LambdaLR(opt, _decay)),
        (_adamw, lambda opt: None),
    ],
    ids=["adamw-steplr", "adamw-cosine", "sgd-linear", "sgd-lambda", "adamw-no-scheduler"],
)
def test_resume_is_bit_exact(tmp_path, make_optimizer, make_scheduler):
    random.seed(0)
    np.random.seed(0)
    model = _model(seed=0)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    _train(model, optimizer, scheduler, steps=5)
    save_training_state(tmp_path / "ckpt", model, optimizer, scheduler, state={"step": 5, "best": 0.25})
    _train(model, optimizer, scheduler, steps=4)

    random.seed(1)
    np.random.seed(1)
    resumed = _model(seed=1)
    resumed_optimizer = make_optimizer(resumed)
    resumed_scheduler = make_scheduler(resumed_optimizer)
    state = load_training_state(tmp_path / "ckpt", resumed, resumed_optimizer, resumed_scheduler)
    assert state == {"step": 5, "best": 0.25}
    _train(resumed, resumed_optimizer, resumed_scheduler, steps=4)

    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    for param, resumed_param in zip(model.parameters(), resumed.parameters()):
        resumed_state = resumed_optimizer.state[resumed_param]
        for key, value in optimizer.state[param].items():
            assert torch.equal(torch.as_tensor(resumed_state[key]), torch.as_tensor(value)), key
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed_optimizer.param_groups[0].get("betas") == optimizer.param_groups[0].get("betas")
    if scheduler is not None:
        assert resumed_scheduler.state_dict() == scheduler.state_dict()


def test_checkpoint_layout(tmp_path):
    model = _model(seed=0)
    optimizer = _adamw(model)
    _train(model, optimizer, None, steps=1)
    save_training_state(tmp_path / "ckpt", model, optimizer, state={"epoch": 1})
    assert sorted(os.listdir(tmp_path / "ckpt")) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"
    ]
    tensors, _ = load_tensors(tmp_path / "ckpt" / "optimizer.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(tensors)
    trainer_state = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert trainer_state["optimizer"]["class"] == "AdamW" and trainer_state["state"] == {"epoch": 1}
    assert trainer_state["scheduler"] is None
    rng, _ = load_tensors(tmp_path / "ckpt" / "rng.safetensors")
    assert rng["torch_cpu"].dtype == torch.uint8


def test_tied_weights_round_trip(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    optimizer = _sgd(model)
    save_training_state(tmp_path / "ckpt", model, optimizer)
    fresh = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    fresh[1].weight = fresh[0].weight
    load_training_state(tmp_path / "ckpt", fresh, _sgd(fresh))
    assert torch.equal(fresh[0].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


def test_saving_again_replaces_the_checkpoint_and_leaves_no_debris(tmp_path):
    model = _model(seed=0)
    optimizer = _adamw(model)
    save_training_state(tmp_path / "ckpt", model, optimizer, state={"epoch": 1})
    save_training_state(tmp_path / "ckpt", model, optimizer, state={"epoch": 2})
    assert os.listdir(tmp_path) == ["ckpt"]
    assert load_training_state(tmp_path / "ckpt", _model(seed=1), _adamw(_model(seed=1))) == {"epoch": 2}


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model(seed=0)
    optimizer = _adamw(model)
    save_training_state(tmp_path / "ckpt", model, optimizer, state={"epoch": 1})
    save_tensors, calls = checkpoint.save_tensors, []

    def fail_on_second_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_tensors(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_tensors", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path / "ckpt", model, optimizer, state={"epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    assert load_training_state(tmp_path / "ckpt", model, optimizer) == {"epoch": 1}


class _ScaleWithTensor:
    """A callable LR factor whose attributes (saved by LambdaLR.state_dict) include a tensor."""

    def __init__(self):
        self.scale = torch.tensor(0.5)

    def __call__(self, step):
        return float(self.scale) ** step


def test_unserialisable_scheduler_or_state_raise_before_writing(tmp_path):
    model = _model(seed=0)
    optimizer = _adamw(model)
    with pytest.raises(HfGraftError, match="the scheduler: it is not JSON-serialisable.*StepLR"):
        save_training_state(tmp_path / "ckpt", model, optimizer, LambdaLR(optimizer, _ScaleWithTensor()))
    with pytest.raises(HfGraftError, match="Cannot checkpoint the state: it is not JSON-serialisable"):
        save_training_state(tmp_path / "ckpt", model, optimizer, state={"model": model})
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    model = _model(seed=0)
    with pytest.raises(HfGraftError, match="is not a training checkpoint; refusing to replace it"):
        save_training_state(tmp_path / "results", model, _adamw(model))
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a briefly trained AdamW + StepLR run."""
    model = _model(seed=0)
    optimizer = _adamw(model)
    scheduler = StepLR(optimizer, step_size=2)
    _train(model, optimizer, scheduler, steps=2)
    return save_training_state(tmp_path / "ckpt", model, optimizer, scheduler, state={"epoch": 1})


def _load_into_fresh(directory, width=16, make_optimizer=_adamw) -> str:
    """Load ``directory`` into a fresh run, expecting an error; returns its message."""
    model = _model(seed=1, width=width)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model)
    scheduler = StepLR(optimizer, step_size=2)
    with pytest.raises(HfGraftError) as info:
        load_training_state(directory, model, optimizer, scheduler)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model changed"
    assert not optimizer.state, "a failed load changed the optimizer"
    return str(info.value)


def test_missing_checkpoint(tmp_path):
    message = _load_into_fresh(tmp_path / "nowhere")
    assert "is not a complete training checkpoint (missing model.safetensors" in message


def test_truncated_model_file(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    assert "truncated" in _load_into_fresh(saved)


def test_corrupt_trainer_state(saved):
    (saved / "trainer_state.json").write_text("{")
    assert "trainer_state.json is corrupt: not readable JSON" in _load_into_fresh(saved)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("version", 2, "has checkpoint format version 2; this hf-graft reads version 1"),
        ("format", "other", "is corrupt: no 'hf-graft-training-state' format marker"),
        ("rng", {"python": [3, [1, 2], None]}, "is corrupt: the saved RNG state is malformed"),
        ("scheduler", {"class": "StepLR"}, "is corrupt: the scheduler entry is malformed"),
    ],
    ids=["version", "format", "rng", "scheduler"],
)
def test_tampered_trainer_state(saved, key, value, message):
    data = json.loads((saved / "trainer_state.json").read_text())
    (saved / "trainer_state.json").write_text(json.dumps({**data, key: value}))
    assert message in _load_into_fresh(saved)


def test_stray_optimizer_tensor(saved):
    tensors, _ = load_tensors(saved / "optimizer.safetensors")
    save_tensors({**tensors, "state.99.exp_avg": torch.zeros(1)}, saved / "optimizer.safetensors")
    assert "tensors ['state.99.exp_avg'] match nothing" in _load_into_fresh(saved)


def test_model_of_another_width(saved):
    assert "tensor '0.weight' has shape (16, 4) where (32, 4) expected" in _load_into_fresh(saved, width=32)


def test_optimizer_of_another_class(saved):
    message = _load_into_fresh(saved, make_optimizer=_sgd)
    assert "was saved with optimizer AdamW, not SGD. Pass an optimizer of class AdamW" in message


def test_optimizer_over_other_parameters(saved):
    message = _load_into_fresh(saved, make_optimizer=lambda m: torch.optim.AdamW(m[0].parameters()))
    assert "parameter groups of sizes [6], but this optimizer's are [2]" in message


def test_scheduler_missing_from_checkpoint(tmp_path):
    model = _model(seed=0)
    save_training_state(tmp_path / "ckpt", model, _adamw(model))
    assert "holds no scheduler state; pass scheduler=None" in _load_into_fresh(tmp_path / "ckpt")
