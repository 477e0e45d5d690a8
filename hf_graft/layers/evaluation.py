"""The layer-grafting paper's evaluation: task metrics on generated answers, language metrics on generated text.

Every figure comes from hf-graft's evaluate modules: ``format_hard``, ``format_soft`` and
``factual`` on greedy answers to a task's test prompts; ``lexical_perplexity`` and
``mlm_predictability`` on greedy continuations of held-out text; ``perplexity`` of the model itself
on held-out text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import metrics
from ..causal_lm import encode_text, greedy_answers, perplexity
from ..data import Example
from ..errors import HfGraftError

__all__ = ["language_scores", "task_scores", "text_prompts"]


def task_scores(model, tokenizer, examples: Sequence[Example], *, extra_tokens: int = 4, batch_size: int = 256) -> dict:
    """``format_hard``, ``format_soft`` and ``factual`` of ``model``'s greedy answers to ``examples``.

    Generation runs ``extra_tokens`` past the longest expected answer, so a model that keeps
    talking loses format-hard.
    """
    if not examples:
        raise HfGraftError("task_scores needs at least one (prompt, answer) example.")
    longest = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in examples)
    answers = greedy_answers(
        model, tokenizer, [p for p, _ in examples], max_new_tokens=longest + extra_tokens, batch_size=batch_size
    )
    references = [answer for _, answer in examples]
    return {
        "format_hard": metrics.cached("format_hard").compute(predictions=answers, references=references)["format_hard"],
        "format_soft": metrics.cached("format_soft").compute(predictions=answers)["format_soft"],
        "factual": metrics.cached("factual").compute(predictions=answers, references=references)["factual"],
    }


def text_prompts(tokenizer, text: str, *, count: int = 64, prompt_tokens: int = 24, seed: int = 0) -> list[str]:
    """``count`` prompts of ``prompt_tokens`` tokens cut at random offsets of held-out ``text``."""
    ids = encode_text(tokenizer, text)
    if ids.numel() <= prompt_tokens:
        raise HfGraftError("The held-out text is shorter than one prompt.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - prompt_tokens, (count,), generator=generator).tolist()
    return [tokenizer.decode(ids[s : s + prompt_tokens]) for s in starts]


def language_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    held_out_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    mlm=None,
    mlm_tokenizer=None,
    top_k: int | None = None,
) -> dict:
    """Lexical perplexity (and MLM predictability when ``mlm`` is given) of greedy continuations of ``prompts``.

    ``mlm`` is a masked LM (a model, or a Hub id such as ``"bert-base-uncased"``) with its
    tokenizer; ``top_k`` counts only the words it retrieves, as the paper does. With
    ``held_out_ids``, also the model's own ``perplexity`` on that text.
    """
    continuations = greedy_answers(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    texts = [text if text.strip() else "." for text in continuations]
    scores = {"lexical_perplexity": metrics.cached("lexical_perplexity").compute(data=texts)["lexical_perplexity"]}
    if mlm is not None:
        result = metrics.cached("mlm_predictability").compute(data=texts, model=mlm, tokenizer=mlm_tokenizer, top_k=top_k)
        scores["mlm_predictability"] = result["mlm_predictability"]
    if held_out_ids is not None:
        scores["perplexity"] = perplexity(model, held_out_ids)["perplexity"]
    return scores
