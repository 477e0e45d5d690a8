"""Embedded data: the pydoc corpus split, the arithmetic tasks and the offline tokenizer."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_graft.data import (
    BOUNDARY_TOKEN,
    addition,
    corpus_tokenizer,
    modular_addition,
    pydoc_corpus,
    pydoc_text,
    train_tokenizer,
)
from hf_graft.errors import HfGraftError


@pytest.fixture(scope="module")
def tokenizer():
    return corpus_tokenizer()


def operands(prompt: str) -> tuple[int, int]:
    left, right = prompt.split("mod")[0].rstrip("= \n").replace(" ", "").split("+")
    return int(left), int(right)


def test_corpus_split_is_deterministic_disjoint_and_holds_out_a_few_percent():
    split = pydoc_corpus()
    assert split == pydoc_corpus()
    assert 400_000 < len(pydoc_text()) and len(split.train) + len(split.held_out) < len(pydoc_text())
    assert 0.05 < len(split.held_out) / len(pydoc_text()) < 0.11
    train_paragraphs = set(split.train.split("\n\n"))
    held_out = [p for p in split.held_out.split("\n\n") if len(p) > 200]
    assert held_out and not train_paragraphs & set(held_out)


def test_corpus_rejects_a_bad_split():
    with pytest.raises(HfGraftError, match="held_out_every"):
        pydoc_corpus(held_out_every=1)


def test_addition_format_answers_and_seeds():
    task = addition(2, train_size=300, test_size=50)
    assert task.name == "addition-2d" and len(task.train) == 300 and len(task.test) == 50
    for prompt, answer in task.train + task.test:
        a, b = operands(prompt)
        assert prompt == f"{a}+{b}=" and answer == str(a + b) and 0 <= a < 100 and 0 <= b < 100
    assert addition(2, train_size=300, test_size=50) == task
    assert addition(2, train_size=300, test_size=50, seed=1).train != task.train
    assert len(set(task.train)) == 300 and len(set(task.test)) == 50


def test_train_and_test_never_share_an_operand_pair_even_swapped_or_across_seeds():
    tests = {frozenset(operands(p)) for p, _ in addition(2, train_size=100, test_size=200).test}
    for seed in range(3):
        train = {frozenset(operands(p)) for p, _ in addition(2, train_size=2000, test_size=10, seed=seed).train}
        assert not tests & train


def test_modular_addition_has_the_hard_format():
    task = modular_addition(4, train_size=200, test_size=100)
    for prompt, answer in task.train + task.test:
        a, b = operands(prompt)
        assert prompt == f"{a} + {b} mod 4\n" and answer == f"The result is {(a + b) % 4}"
    train = {frozenset(operands(p)) for p, _ in task.train}
    assert not train & {frozenset(operands(p)) for p, _ in task.test}


def test_tasks_refuse_what_they_cannot_give():
    with pytest.raises(HfGraftError, match="found only .* distinct test"):
        addition(1, train_size=10, test_size=90)
    with pytest.raises(HfGraftError, match="test_fraction"):
        addition(2, test_fraction=1.0)
    with pytest.raises(HfGraftError, match="modulus"):
        modular_addition(1)


def test_tokenizer_spells_digits_and_round_trips(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) == 512
    ids = tokenizer("12+345=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(BOUNDARY_TOKEN)
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["1", "2", "+", "3", "4", "5", "="]
    text = 'The "assert" statement: x ∈ ℝ, naïve 42'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)


def test_tokenizer_is_deterministic_and_saves_like_any_hf_tokenizer(tokenizer, tmp_path):
    assert corpus_tokenizer().get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "def f(x):\n    return x + 1  # 17+25=42"
    assert loaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    for encoder in (tokenizer, loaded):  # a causal LM's inputs only, so model(**encoder(text)) works on every line
        assert set(encoder(["12+7=", "x"], padding=True, return_tensors="pt")) == {"input_ids", "attention_mask"}


def test_train_tokenizer_needs_room_for_the_bytes():
    with pytest.raises(HfGraftError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_string_tasks_have_fixed_formats_and_disjoint_splits():
    from hf_graft.data import copying, reversal

    for task, check in ((reversal(train_size=300, test_size=50), lambda w, a: a == w[::-1]),
                        (copying(train_size=300, test_size=50), lambda w, a: a == f"<<{w}>>")):
        assert len(task.train) == 300 and len(task.test) == 50
        assert not {p for p, _ in task.train} & {p for p, _ in task.test}
        for prompt, answer in task.train + task.test:
            word = prompt.split(": ", 1)[1].rstrip("\n")
            assert word.isalpha() and 3 <= len(word) <= 6 and check(word, answer)
    assert reversal(seed=1).train != reversal(seed=0).train and reversal(seed=0).train == reversal(seed=0).train
