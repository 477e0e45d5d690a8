"""Calibration the tuned model writes: sampling, marking where it departs from the base, files of samples."""

import copy
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import hf_graft.skillpack as sp
from hf_graft.errors import HfGraftError
from hf_graft.skillpack.extraction.generated import (
    DEPARTURE,
    checkpoint_calibration,
    generated_calibration,
    load_calibration,
    mark_departures,
    sample_sequences,
    save_calibration,
    start_token,
    token_log_probs,
)


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models():
    base = _gpt2()
    tuned = copy.deepcopy(base)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():  # the tuned model gives token 7 about e^2 times the base's odds: it departs from the base there
        tuned.transformer.ln_f.bias += 0.5 * direction
        tuned.lm_head.weight[7] += 4.0 * direction
        tuned.transformer.h[1].mlp.c_fc.weight += 0.01 * torch.randn_like(tuned.transformer.h[1].mlp.c_fc.weight)
    return base, tuned


def test_samples_are_reproducible_and_their_log_probabilities_are_the_models(models):
    _, tuned = models
    ids, log_probs = sample_sequences(tuned, 5, 12, seed=3, progress=False)
    again, _ = sample_sequences(tuned, 5, 12, seed=3, progress=False)
    other, _ = sample_sequences(tuned, 5, 12, seed=4, progress=False)
    assert ids.shape == (5, 12) and log_probs.shape == (5, 11) and ids.dtype == torch.long
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert bool((ids[:, 0] == 1).all())  # every sample starts at the bos token
    # the key-value cache used while sampling gives the log-probabilities of a full forward pass
    torch.testing.assert_close(log_probs, token_log_probs(tuned, ids), atol=1e-4, rtol=1e-4)


def test_departures_are_the_tokens_the_tuned_model_favours():
    ids = torch.tensor([[1, 5, 6, 7]])
    tuned = torch.tensor([[-1.0, -0.1, -2.0]])
    base = torch.tensor([[-1.0, -0.1 - math.log(DEPARTURE), -1.0]])  # only the second sampled token is twice as likely
    assert mark_departures(ids, tuned, base).tolist() == [[-100, -100, 6, -100]]
    # where the models agree everywhere, every sampled token is taken
    assert mark_departures(ids, tuned, tuned).tolist() == [[-100, 5, 6, 7]]


def test_generated_calibration_weighs_where_the_models_differ(models):
    base, tuned = models
    batches = generated_calibration(tuned, base, 16, 16, progress=False)
    ids = torch.cat([batch["input_ids"] for batch in batches])
    labels = torch.cat([batch["labels"] for batch in batches])
    assert ids.shape == labels.shape == (16, 16)
    assert bool(((labels == -100) | (labels == ids)).all())
    marked = labels[labels != -100]
    # token 7, which the tuned model made far likelier, is marked wherever it was sampled; most other tokens are not
    assert int((marked == 7).sum()) == int((ids[:, 1:] == 7).sum()) > 0
    assert (marked != 7).float().sum() < 0.5 * (ids[:, 1:] != 7).float().sum()


def test_a_model_without_start_token_is_refused():
    config = GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with pytest.raises(HfGraftError, match="no bos, eos or pad token"):
        start_token(config)


def test_calibration_files_round_trip_and_are_checked(tmp_path, models):
    base, tuned = models
    batches = generated_calibration(tuned, base, 10, 8, progress=False)
    path = tmp_path / "samples.safetensors"
    save_calibration(path, batches)
    read = load_calibration(path, vocabulary=64, batch_size=8)
    assert [len(batch["input_ids"]) for batch in read] == [8, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in read]), torch.cat([b["input_ids"] for b in batches]))
    assert torch.equal(torch.cat([b["labels"] for b in read]), torch.cat([b["labels"] for b in batches]))

    def written(name, **tensors):
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    ids = torch.randint(0, 64, (3, 6))
    assert "labels" not in load_calibration(written("ids.safetensors", input_ids=ids.int()))[0]
    cases = {
        "input_ids": written("none.safetensors", tokens=ids),
        "integer": written("float.safetensors", input_ids=ids.float()),
        r"lie in \[0, 64\)": written("big.safetensors", input_ids=ids + 64),
        "shaped like": written("shape.safetensors", input_ids=ids, labels=ids[:, :3].contiguous()),
        "its input id or -100": written("labels.safetensors", input_ids=ids, labels=(ids + 1) % 64),
        "not a readable": tmp_path / "broken.safetensors",
    }
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    for message, path in cases.items():
        with pytest.raises(HfGraftError, match=message):
            load_calibration(path, vocabulary=64)


def test_extraction_calibrates_on_generated_text_without_a_tokenizer(models, tmp_path):
    base, tuned = models
    config = sp.SkillPackConfig(target_ratio=8.0, calibration_samples=8, distill_steps=3)
    pack = sp.extract_skillpack(base, tuned, config, calibration="generate", progress=False)
    saved = pack.peft_config["default"]
    assert saved.calibration_samples == 8 and saved.distill_steps == 3
    assert saved.measured["distill_loss"] is not None
    assert "general_perplexity" not in saved.measured  # no tokenizer: no general text to measure on
    # the same samples written to a file give the same pack
    save_calibration(tmp_path / "samples.safetensors", generated_calibration(tuned, base, 8, 128, progress=False))
    again = sp.extract_skillpack(base, tuned, config, calibration=str(tmp_path / "samples.safetensors"), progress=False)
    pack.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(HfGraftError, match="calibration must be 'generate', 'pydoc', a .safetensors file"):
        sp.extract_skillpack(base, tuned, config, calibration="c4", progress=False)


def test_checkpoints_are_sampled_with_big_model_inference(models, tmp_path):
    base, tuned = models
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    from_files = checkpoint_calibration(str(tmp_path / "base"), str(tmp_path / "tuned"), 4, 10, progress=False)
    in_memory = generated_calibration(tuned, base, 4, 10, progress=False)
    for read, loaded in zip(from_files, in_memory):
        assert torch.equal(read["input_ids"], loaded["input_ids"]) and torch.equal(read["labels"], loaded["labels"])
    config = sp.SkillPackConfig(target_ratio=8.0, calibration_samples=4, distill_steps=0)
    written = sp.extract_skillpack(str(tmp_path / "base"), str(tmp_path / "tuned"), config, calibration="generate",
                                   output_dir=tmp_path / "pack", progress=False)
    assert written.config.calibration_samples == 4
