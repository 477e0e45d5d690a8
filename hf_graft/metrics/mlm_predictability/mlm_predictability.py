"""MLM predictability of texts under a masked language model, as an ``evaluate`` measurement.

The layer-grafting paper checks that a graft keeps the host's language natural by asking a masked
LM (BERT-base-uncased) how predictable each word of the generated text is from the rest: mask the
word, read the probability the MLM gives the original, average. Fluent text scores high, word salad
near 0. It looks at one text at a time and compares it with nothing, so it is an
``evaluate.Measurement``, like the Hub's model-based ``perplexity`` measurement. The masked LM is
given at compute time, by name or path (loaded with ``AutoModelForMaskedLM``/``AutoTokenizer``) or
as built objects; every masked copy of every text goes through the model in batches.
"""

import math
import re
from collections import Counter

import datasets
import evaluate
import numpy as np
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer


_WORD_CHARACTER = re.compile(r"\w")

_DESCRIPTION = """
For each word w_i of a text, every sub-token of w_i is replaced by the mask token and the masked LM
gives p(w_i | rest of the text), the product of the probabilities of the word's original sub-tokens
at their masked positions (for a one-token word, exactly the probability of that token). A text's
score is the mean of p over its words; the result is the mean over texts. Words are the tokenizer's
own words (its pre-tokenizer splits, as `word_ids()` reports them: for BERT, runs of letters or
digits and single punctuation marks) that contain a word character (regex \\w), so punctuation stays
visible as context but is not scored. With `top_k`, only the words "retrieved" by the MLM count
(every sub-token among the k most probable at its position), as in the paper's formula; a text with
words but none retrieved scores 0.0. Texts longer than the model's window are cut to it, and only
words whole within it are scored. A text without a word scores NaN and is left out of the mean.
"""

_KWARGS_DESCRIPTION = """
Args:
    data (`list` of `str`): Texts, e.g. a model's generated continuations.
    model (`str` or `transformers.PreTrainedModel`): The masked LM: a Hub id or local path (the
        paper uses "bert-base-uncased"), or a built model such as a `BertForMaskedLM`, which runs
        on its own device and is put back in its training mode afterwards.
    tokenizer (`str` or `transformers.PreTrainedTokenizerFast`, *optional*): The model's tokenizer,
        fast (it must report `word_ids()`) and with a mask token. Defaults to `model` when `model`
        is a name or path; required with a built model.
    batch_size (`int`, defaults to 16): Masked copies per forward pass. Memory grows with
        batch_size x text length x vocabulary size.
    top_k (`int`, *optional*): Count only the words whose every sub-token is among the model's
        top_k predictions at its position (the paper's "retrieved" words). Defaults to `None`:
        every word counts.
    device (`str`, *optional*): Where to run a model loaded by name; defaults to "cuda" when
        available, else "cpu".

Returns:
    mlm_predictability (`float`): The mean of the per-text scores, between 0.0 and 1.0 (NaN when
        no text has a word).
    scores (`list` of `float`): Each text's mean word probability (NaN for a text without a word).
    num_words (`list` of `int`): The number of words scored in each text.
    num_retrieved (`list` of `int`): The number of retrieved words in each text; only with `top_k`.

Examples:
    >>> mlm = hf_graft.metrics.load("mlm_predictability")
    >>> result = mlm.compute(data=["The cat sat on the mat."], model="bert-base-uncased")
    >>> result["num_words"]  # "the cat sat on the mat": the "." is context, not a word
    [6]
"""

_CITATION = """
@misc{zimmermann_boussard_layer_grafting,
  title={Transplanting Knowledge: A Study on Layer-Specific Grafting in {LLMs}},
  author={Zimmermann, Bastien and Boussard, Matthieu},
  howpublished={craft ai}
}
@inproceedings{devlin-etal-2019-bert,
  title={{BERT}: Pre-training of Deep Bidirectional Transformers for Language Understanding},
  author={Devlin, Jacob and Chang, Ming-Wei and Lee, Kenton and Toutanova, Kristina},
  booktitle={Proceedings of the 2019 Conference of the North {A}merican Chapter of the Association for
             Computational Linguistics},
  year={2019},
  pages={4171--4186}
}
"""


def _masked_copies(text, tokenizer, max_length):
    """One (input_ids, masked positions, original ids) per scorable word of ``text``."""
    encoding = tokenizer(text, truncation=True, max_length=max_length)
    input_ids = encoding["input_ids"]
    positions = {}
    for position, word in enumerate(encoding.word_ids()):
        if word is not None:
            positions.setdefault(word, []).append(position)
    # A word cut by the truncation has fewer sub-tokens here than in the full text: skip it.
    full_length = Counter(word for word in tokenizer(text, add_special_tokens=False, verbose=False).word_ids())
    copies = []
    for word, word_positions in positions.items():
        span = encoding.word_to_chars(word)
        if len(word_positions) != full_length[word] or not _WORD_CHARACTER.search(text[span.start : span.end]):
            continue
        masked = list(input_ids)
        for position in word_positions:
            masked[position] = tokenizer.mask_token_id
        copies.append((masked, word_positions, [input_ids[position] for position in word_positions]))
    return copies


def _word_scores(model, copies, batch_size, pad_id, top_k):
    """Probability of each copy's masked word and whether the model retrieves it (top_k), batched."""
    device = next(model.parameters()).device
    order = sorted(range(len(copies)), key=lambda i: len(copies[i][0]))
    probabilities, retrieved = [0.0] * len(copies), [True] * len(copies)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(copies[i][0]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, columns, targets, owners = [], [], [], []
        for row, i in enumerate(chunk):
            ids, positions, originals = copies[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            rows += [row] * len(positions)
            columns += positions
            targets += originals
            owners += [i] * len(positions)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        selected = logits[torch.tensor(rows, device=device), torch.tensor(columns, device=device)].float()
        targets = torch.tensor(targets, device=device).unsqueeze(1)
        log_probs = torch.log_softmax(selected, dim=-1).gather(1, targets).squeeze(1).tolist()
        if top_k is not None:
            ranks = (selected > selected.gather(1, targets)).sum(dim=1).tolist()
        log_word = {}
        for k, i in enumerate(owners):
            log_word[i] = log_word.get(i, 0.0) + log_probs[k]
            if top_k is not None and ranks[k] >= top_k:
                retrieved[i] = False
        for i, value in log_word.items():
            probabilities[i] = math.exp(value)
    return probabilities, retrieved


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MlmPredictability(evaluate.Measurement):
    """Mean probability a masked LM gives each word of a text when that word is masked."""

    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"data": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/tasks/masked_language_modeling"],
        )

    def _compute(self, data, model=None, tokenizer=None, batch_size=16, top_k=None, device=None):
        if not data:
            raise ValueError("MLM predictability is undefined without texts: pass at least one.")
        if model is None:
            raise ValueError(
                'mlm_predictability needs a masked LM: pass model="bert-base-uncased" (the paper\'s), '
                "another name or path, or a built model with its tokenizer."
            )
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if top_k is not None and not (isinstance(top_k, int) and top_k > 0):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")
        if isinstance(model, str):
            tokenizer = AutoTokenizer.from_pretrained(model) if tokenizer is None else tokenizer
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = AutoModelForMaskedLM.from_pretrained(model).to(device)
        elif tokenizer is None:
            raise ValueError("A built model needs its tokenizer: pass tokenizer= along with model=.")
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"mlm_predictability needs a fast tokenizer (one that reports word_ids()), got "
                f"{type(tokenizer).__name__}: load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
            )
        if tokenizer.mask_token_id is None:
            raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no mask token: pass a masked LM's tokenizer.")
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model embeds only "
                f"{model.get_input_embeddings().num_embeddings}: pass the tokenizer that goes with the model."
            )
        positions = getattr(model.config, "max_position_embeddings", None) or math.inf
        max_length = min(tokenizer.model_max_length, positions)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        per_text = [_masked_copies(text, tokenizer, max_length) for text in data]
        copies = [copy for text_copies in per_text for copy in text_copies]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                probabilities, retrieved = _word_scores(model, copies, batch_size, pad_id, top_k)
        finally:
            model.train(was_training)

        scores, num_words, num_retrieved, start = [], [], [], 0
        for text_copies in per_text:
            words = range(start, start + len(text_copies))
            start += len(text_copies)
            kept = [probabilities[i] for i in words if top_k is None or retrieved[i]]
            num_words.append(len(words))
            num_retrieved.append(len(kept))
            if not words:
                scores.append(math.nan)
            else:
                scores.append(float(np.mean(kept)) if kept else 0.0)
        scored = [score for score in scores if not math.isnan(score)]
        result = {
            "mlm_predictability": float(np.mean(scored)) if scored else math.nan,
            "scores": scores,
            "num_words": num_words,
        }
        if top_k is not None:
            result["num_retrieved"] = num_retrieved
        return result
