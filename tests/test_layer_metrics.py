"""The layer-grafting paper's metrics: format-hard, format-soft, factual, lexical perplexity, MLM predictability."""

import math
import socket
from pathlib import Path

import evaluate
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from hf_graft import metrics
from hf_graft.data import train_tokenizer


LAYER_METRICS = ["factual", "format_hard", "format_soft", "lexical_perplexity", "mlm_predictability"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "play", "##ing", "."]
WINDOW = 16  # the tiny MLM's max_position_embeddings: 14 tokens of text between [CLS] and [SEP]


def load(name):
    """Load a module keeping its data in memory, so tests write no cache files."""
    return metrics.load(name, keep_in_memory=True)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    """A WordPiece BERT tokenizer over a 13-token vocabulary, built offline."""
    folder = tmp_path_factory.mktemp("bert_vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def bert(bert_tokenizer):
    """A tiny random BertForMaskedLM (with dropout, so forgetting eval() would show)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=WINDOW,
    )
    return BertForMaskedLM(config)


def hand_probabilities(model, tokens, words):
    """p(word | rest) for each word (a list of token positions), one unbatched forward pass per word."""
    ids = [VOCAB.index(token) for token in tokens]
    model.eval()
    probabilities, ranks = [], []
    for positions in words:
        masked = [VOCAB.index("[MASK]") if i in positions else token_id for i, token_id in enumerate(ids)]
        with torch.no_grad():
            logits = model(torch.tensor([masked])).logits[0]
        probabilities.append(math.prod(torch.softmax(logits[p], dim=-1)[ids[p]].item() for p in positions))
        ranks.append(max(int((logits[p] > logits[p, ids[p]]).sum()) for p in positions))
    return probabilities, ranks


def test_every_layer_metric_loads_by_name_with_a_card():
    assert set(LAYER_METRICS) <= set(metrics.available())
    package_dir = Path(metrics.__file__).parent
    for name in LAYER_METRICS:
        assert isinstance(load(name), evaluate.EvaluationModule)
        assert (package_dir / name / "README.md").is_file()
        assert not (package_dir / name / "__init__.py").exists()


def test_format_hard_accepts_exactly_the_reference_wording():
    format_hard = load("format_hard")
    predictions = ["The result is 3", "The result is  3", "result: 3", "The result is -2."]
    assert format_hard.compute(predictions=predictions, references=["The result is 1"] * 4) == {"format_hard": 0.25}
    # Surrounding whitespace is ignored; any integer, negative too, fills the number's place.
    accepted = [" The result is -12\n", "The result is 0", "\tThe result is 123456 "]
    assert format_hard.compute(predictions=accepted, references=["The result is 2"] * 3) == {"format_hard": 1.0}
    # Case, trailing text, a decimal or a missing number break the format.
    rejected = ["the result is 3", "The result is 3 apples", "The result is 3\nThe result is 1", "The result is 2.5",
                "The result is", "The result is x"]
    assert format_hard.compute(predictions=rejected, references=["The result is 2"] * 6) == {"format_hard": 0.0}


def test_format_hard_reads_the_format_off_each_reference():
    format_hard = load("format_hard")
    assert format_hard.compute(predictions=["46", "x = 1.5", "x = 2"], references=["7", "x = 0.25", "x = 0.25"]) == {
        "format_hard": 2 / 3
    }


def test_format_soft_counts_outputs_with_exactly_one_number():
    format_soft = load("format_soft")
    predictions = ["The result is -2.", "-7", "It is 2.5", "2 + 2", "no number", "1,000", "3 then -3"]
    assert format_soft.compute(predictions=predictions) == {"format_soft": 3 / 7}


def test_factual_compares_the_first_number_with_the_answer():
    factual = load("factual")
    predictions = ["The result is -2", "The result is -2", "no number", "3 then 2", "2 then 3", "2.0", "x2"]
    references = [-2, 2, 2, 2, 2, 2, 2]  # right: 0, 4, 5 and 6
    assert factual.compute(predictions=predictions, references=references) == {"factual": 4 / 7}
    answers = ["The result is 2", "The result is -1", "-1"]
    assert factual.compute(predictions=["The result is 2", "The result is 1", "-1."], references=answers) == {
        "factual": 2 / 3
    }
    with pytest.raises(ValueError, match=r"positions \[1\] contain no number"):
        factual.compute(predictions=["1", "2"], references=["1", "two"])


def test_the_three_task_metrics_combine():
    task_metrics = evaluate.combine([load("format_hard"), load("format_soft"), load("factual")])
    result = task_metrics.compute(
        predictions=["The result is 3", "It is 2", "The result is 2", "nothing"], references=["The result is 2"] * 4
    )
    assert result == {"format_hard": 0.5, "format_soft": 0.75, "factual": 0.5}


def test_lexical_perplexity_of_known_texts():
    lexical = load("lexical_perplexity")
    assert lexical.compute(data=["a a b b", "a b c d"]) == {"lexical_perplexity": 3.0, "perplexities": [2.0, 4.0]}
    # Lowercased \w+ words: case and punctuation do not count; one repeated word is 1.
    assert lexical.compute(data=["A b, c. D!", "the the the"])["perplexities"] == [4.0, 1.0]
    entropy = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert lexical.compute(data=["a a b"])["lexical_perplexity"] == pytest.approx(2**entropy, rel=1e-12)


def test_lexical_perplexity_leaves_texts_without_words_out_of_the_mean():
    result = load("lexical_perplexity").compute(data=["a a b b", "", "?!"])
    assert result["lexical_perplexity"] == 2.0
    assert result["perplexities"][0] == 2.0 and all(math.isnan(value) for value in result["perplexities"][1:])
    assert math.isnan(load("lexical_perplexity").compute(data=[""])["lexical_perplexity"])


def test_mlm_predictability_equals_the_hand_computed_mean(bert, bert_tokenizer):
    # "playing" is play + ##ing: both masked, probabilities multiplied; "." is context, not a word.
    first, _ = hand_probabilities(
        bert, ["[CLS]", "the", "cat", "sat", "play", "##ing", ".", "[SEP]"], [[1], [2], [3], [4, 5]]
    )
    second, _ = hand_probabilities(bert, ["[CLS]", "the", "mat", "[SEP]"], [[1], [2]])
    bert.train()
    result = load("mlm_predictability").compute(
        data=["The cat sat playing.", "the mat", ""], model=bert, tokenizer=bert_tokenizer, batch_size=3
    )
    assert bert.training  # its mode is given back
    expected = [sum(first) / 4, sum(second) / 2]
    assert result["scores"][:2] == pytest.approx(expected, rel=1e-5)
    assert math.isnan(result["scores"][2])
    assert result["num_words"] == [4, 2, 0]
    assert result["mlm_predictability"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert 0.0 <= result["mlm_predictability"] <= 1.0
    assert set(result) == {"mlm_predictability", "scores", "num_words"}


def test_mlm_predictability_does_not_depend_on_the_batch_size(bert, bert_tokenizer):
    mlm = load("mlm_predictability")
    texts = ["the cat sat on the mat .", "playing", "the cat"]
    one = mlm.compute(data=texts, model=bert, tokenizer=bert_tokenizer, batch_size=1)
    many = mlm.compute(data=texts, model=bert, tokenizer=bert_tokenizer, batch_size=64)
    assert many["scores"] == pytest.approx(one["scores"], rel=1e-5)
    assert many["num_words"] == one["num_words"] == [6, 1, 2]


def test_mlm_predictability_top_k_keeps_the_retrieved_words(bert, bert_tokenizer):
    tokens = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
    probabilities, ranks = hand_probabilities(bert, tokens, [[i] for i in range(1, 7)])
    mlm = load("mlm_predictability")
    for top_k in (1, 3):
        kept = [p for p, rank in zip(probabilities, ranks) if rank < top_k]
        result = mlm.compute(data=["the cat sat on the mat"], model=bert, tokenizer=bert_tokenizer, top_k=top_k)
        assert result["num_retrieved"] == [len(kept)]
        assert result["scores"] == pytest.approx([sum(kept) / len(kept) if kept else 0.0], rel=1e-5)
    everything = mlm.compute(data=["the cat sat on the mat"], model=bert, tokenizer=bert_tokenizer, top_k=len(VOCAB))
    assert everything["num_retrieved"] == everything["num_words"] == [6]
    assert everything["scores"] == pytest.approx([sum(probabilities) / 6], rel=1e-5)


def test_mlm_predictability_scores_only_words_whole_in_the_window(bert, bert_tokenizer):
    mlm = load("mlm_predictability")
    fits = mlm.compute(data=["the cat " * 6 + "playing"], model=bert, tokenizer=bert_tokenizer)
    assert fits["num_words"] == [13]  # 12 + play ##ing = 14 tokens
    cut = mlm.compute(data=["the cat " * 6 + "sat playing on"], model=bert, tokenizer=bert_tokenizer)
    assert cut["num_words"] == [13]  # ##ing falls outside the window: playing is not scored


def test_mlm_predictability_loads_a_model_by_path_offline(bert, bert_tokenizer, tmp_path, monkeypatch):
    bert.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    built = load("mlm_predictability").compute(data=["the cat sat playing"], model=bert, tokenizer=bert_tokenizer)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    by_path = load("mlm_predictability").compute(data=["the cat sat playing"], model=str(tmp_path), device="cpu")
    assert by_path["scores"] == pytest.approx(built["scores"], rel=1e-5)


def test_mlm_predictability_explains_what_it_needs(bert, bert_tokenizer):
    mlm = load("mlm_predictability")
    with pytest.raises(ValueError, match="needs a masked LM"):
        mlm.compute(data=["the cat"])
    with pytest.raises(ValueError, match="needs its tokenizer"):
        mlm.compute(data=["the cat"], model=bert)
    with pytest.raises(ValueError, match="no mask token"):
        mlm.compute(data=["the cat"], model=bert, tokenizer=train_tokenizer(["the cat sat"], vocab_size=258))
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        mlm.compute(data=["the cat"], model=bert, tokenizer=bert_tokenizer, top_k=0)
