"""The exact_match and perplexity evaluate modules, and the causal-LM helpers that feed them."""

import math

import pytest
import torch

from hf_graft import metrics
from hf_graft.causal_lm import (
    Schedule,
    build_causal_lm,
    example_batches,
    exact_match,
    finetune,
    perplexity,
    perplexity_plateau,
    pretrain,
    skill_learned,
    task_batch,
    tiny_llama_config,
)
from hf_graft.data import corpus_tokenizer
from hf_graft.errors import HfGraftError


def load(name):
    return metrics.load(name, keep_in_memory=True)


@pytest.fixture(scope="module")
def tokenizer():
    return corpus_tokenizer()


@pytest.fixture(scope="module")
def silent_model(tokenizer):
    """A tiny Llama whose final norm is zero: every logit is 0, so every token is equally likely
    and greedy decoding picks token 0, the end-of-text token, at once."""
    model = build_causal_lm(tiny_llama_config(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def test_both_modules_ship_with_a_card():
    assert {"exact_match", "perplexity"} <= set(metrics.available())


def test_exact_match_of_known_strings():
    exact = load("exact_match")
    assert exact.compute(predictions=["357", "The result is 2", "41 "], references=["357", "The result is 3", "41"]) == {
        "exact_match": 1 / 3
    }
    assert exact.compute(predictions=["The Result is 2"], references=["the result is 2"], ignore_case=True) == {"exact_match": 1.0}
    assert exact.compute(
        predictions=["Result: 2!", "y=1"], references=["Result 7", "x=2"], ignore_punctuation=True, ignore_numbers=True
    ) == {"exact_match": 0.5}
    assert exact.compute(predictions=["a 12", "b"], references=["a 13", "b"], regexes_to_ignore=[r"\d+"]) == {"exact_match": 1.0}


def test_perplexity_of_known_likelihoods():
    result = load("perplexity").compute(nll=[2.0, 6.0], num_tokens=[2, 2])
    assert result == {
        "perplexity": math.exp(2.0),
        "mean_perplexity": (math.exp(1.0) + math.exp(3.0)) / 2,
        "nll_per_token": 2.0,
        "num_tokens": 4,
    }
    weighted = load("perplexity").compute(nll=[3.0, 1.0], num_tokens=[3, 1])
    assert weighted["perplexity"] == math.e and weighted["mean_perplexity"] == math.e


def test_perplexity_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        load("perplexity").compute(nll=[1.0], num_tokens=[0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        load("perplexity").compute(nll=[-1.0], num_tokens=[3])


def test_uniform_model_has_the_vocabulary_size_as_perplexity(tokenizer, silent_model):
    ids = torch.arange(300) % len(tokenizer)
    result = perplexity(silent_model, ids, seq_len=64, batch_size=2)
    assert result["num_tokens"] == 4 * 63
    assert result["perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)


def test_exact_match_counts_answers_that_end_with_eos(tokenizer, silent_model):
    assert exact_match(silent_model, tokenizer, [("1+1=", ""), ("2+2=", "")], batch_size=1) == 1.0
    assert exact_match(silent_model, tokenizer, [("1+1=", "2"), ("2+2=", "")]) == 0.5


def test_perplexity_plateau_stops_when_nothing_improves(silent_model):
    stop = perplexity_plateau(silent_model, torch.arange(200) % 500)
    assert stop() is False  # the first check sets the best
    assert stop() is True  # the same perplexity again: flat


def test_skill_learned_compares_held_back_exact_match_with_the_threshold(tokenizer, silent_model):
    held_back = [("1+1=", ""), ("2+2=", "4")]  # the silent model answers "" (exact match 0.5)
    assert skill_learned(silent_model, tokenizer, held_back, threshold=0.5)() is True
    assert skill_learned(silent_model, tokenizer, held_back, threshold=0.51)() is False
    with pytest.raises(HfGraftError, match="at least one held-back"):
        skill_learned(silent_model, tokenizer, [])


def test_training_is_seeded_and_stops_when_asked(tokenizer):
    config = tiny_llama_config(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = torch.arange(400) % len(tokenizer)
    schedule = Schedule(steps=3, batch_size=2, learning_rate=1e-3)
    first, second = build_causal_lm(config), build_causal_lm(config)
    assert pretrain(first, text, schedule, seq_len=16, progress=False) == pretrain(second, text, schedule, seq_len=16, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    losses = finetune(
        first, tokenizer, [("1+2=", "3")], Schedule(steps=50, batch_size=2, learning_rate=1e-3),
        stop=lambda: True, check_every=2, progress=False,
    )
    assert len(losses) == 2


def test_rehearsal_against_a_reference_holds_the_model_to_its_predictions(tokenizer):
    import copy

    config = tiny_llama_config(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = torch.randint(0, len(tokenizer), (600,), generator=torch.Generator().manual_seed(0))
    base = build_causal_lm(config)
    pretrain(base, text, Schedule(steps=20, batch_size=4, learning_rate=3e-3), seq_len=16, progress=False)
    schedule = Schedule(steps=40, batch_size=4, learning_rate=1e-2, seed=2)
    plain, text_rehearsal, with_reference = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    finetune(plain, tokenizer, [("1+2=", "3")], schedule, progress=False)
    rehearsal = dict(replay_ids=text, replay_batch_size=4, seq_len=16, progress=False)
    finetune(text_rehearsal, tokenizer, [("1+2=", "3")], schedule, **rehearsal)
    finetune(with_reference, tokenizer, [("1+2=", "3")], schedule, replay_reference=base, **rehearsal)
    windows = text[:160].reshape(10, 16)

    def drift(model):  # KL from the base's next-token distributions on the text
        with torch.no_grad():
            target = torch.log_softmax(base(input_ids=windows).logits, -1)
            predicted = torch.log_softmax(model(input_ids=windows).logits, -1)
        return float((target.exp() * (target - predicted)).sum(-1).mean())

    assert drift(base) == pytest.approx(0.0, abs=1e-6)
    assert drift(with_reference) < 0.5 * min(drift(plain), drift(text_rehearsal))
    with pytest.raises(HfGraftError, match="replay_reference needs replay_ids"):
        finetune(plain, tokenizer, [("1+2=", "3")], schedule, replay_reference=base, progress=False)


def test_task_batch_labels_only_the_answer_and_eos(tokenizer):
    batch = task_batch(tokenizer, [("1+2=", "3"), ("10+20=", "30")])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 10)
    assert batch["labels"][0].tolist() == [-100] * 5 + [tokenizer.convert_tokens_to_ids("3"), tokenizer.eos_token_id] + [-100] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0] * 3
    assert batch["input_ids"][0, 7:].tolist() == [tokenizer.pad_token_id] * 3


def test_example_batches_group_by_length_without_padding(tokenizer):
    batches = example_batches(tokenizer, [("1+2=", "3"), ("10+20=", "30"), ("4+5=", "9")], batch_size=8)
    assert [tuple(b.shape) for b in batches] == [(2, 7), (1, 10)]
    assert tokenizer.pad_token_id not in torch.cat([b.reshape(-1) for b in batches]).tolist()
