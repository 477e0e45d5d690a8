"""Answers to distil from: the teacher answers the prompt set, the student answers it too.

Answers travel as text, so a teacher and a student with different tokenizers (different
vocabularies, different special tokens) can be paired: each model reads and writes with its own.
"""

from collections.abc import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..causal_lm import greedy_answers
from ..data import Example
from ..errors import HfGraftError

__all__ = ["check_prompts", "model_answers", "preference_pairs"]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list, after checking it is a non-empty sequence of non-empty strings."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise HfGraftError(f"The prompt set must be a list of strings, got {type(prompts).__name__}.")
    prompts = list(prompts)
    if not prompts:
        raise HfGraftError("The prompt set is empty: give at least one prompt to distil on.")
    bad = [i for i, prompt in enumerate(prompts) if not (isinstance(prompt, str) and prompt)]
    if bad:
        raise HfGraftError(f"Prompts must be non-empty strings; entries {bad[:5]} are not.")
    return prompts


def model_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    description: str = "Answering",
    progress: bool = True,
) -> list[Example]:
    """``(prompt, answer)`` pairs: ``model``'s greedy answer to every prompt, batched, up to eos.

    Greedy decoding makes the answers a function of the weights, so a rerun (or another process
    of a distributed run) gets the same set. Empty answers are kept: a student must learn them too.
    """
    prompts = check_prompts(prompts)
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise HfGraftError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise HfGraftError("The tokenizer needs a pad token and an eos token to generate in batches; set them first.")
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        answers += greedy_answers(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return list(zip(prompts, answers))


def preference_pairs(teacher: Sequence[Example], student: Sequence[Example]) -> list[dict]:
    """DPO rows: the teacher's answer chosen, the student's own answer rejected, where they differ.

    Prompts on which the student already answers as the teacher does give no preference and are
    left out. Both lists must answer the same prompts in the same order.
    """
    if [p for p, _ in teacher] != [p for p, _ in student]:
        raise HfGraftError("The teacher's and the student's answers must be for the same prompts, in the same order.")
    return [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        for (prompt, chosen), (_, rejected) in zip(teacher, student)
        if chosen != rejected
    ]
