"""Small causal language models for benchmarks: build one, pretrain it, fine-tune it, evaluate it.

Plain torch loops, seeded, with tqdm progress, for models small enough to train on a CPU in
minutes (a Llama of a few hundred thousand parameters on :func:`hf_graft.data.pydoc_corpus`).
The same functions take any ``transformers`` causal LM, a ``PeftModel`` included, so benchmarks
of SkillPacks, layer grafting and skill fusion share them. Every figure a benchmark reports comes
through hf-graft's evaluate modules: :func:`exact_match` and :func:`perplexity`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from . import metrics
from .data import Example
from .errors import HfGraftError

__all__ = [
    "Schedule",
    "build_causal_lm",
    "encode_text",
    "example_batches",
    "exact_match",
    "finetune",
    "greedy_answers",
    "perplexity",
    "perplexity_plateau",
    "pretrain",
    "skill_learned",
    "task_batch",
    "tiny_config",
    "tiny_gpt_neox_config",
    "tiny_llama_config",
]


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    **overrides,
) -> LlamaConfig:
    """A small ``LlamaConfig`` matching ``tokenizer``'s vocabulary and special tokens.

    ``intermediate_size`` defaults to Llama's ratio, 8/3 of ``hidden_size`` rounded up to a
    multiple of 8; ``overrides`` go to ``LlamaConfig`` unchanged.
    """
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size or 8 * math.ceil(hidden_size * 8 / 3 / 8),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def tiny_gpt_neox_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    **overrides,
) -> GPTNeoXConfig:
    """A small pythia-like ``GPTNeoXConfig`` (parallel residual, 25% rotary, untied embeddings) for
    ``tokenizer``; ``intermediate_size`` defaults to pythia's 4x ``hidden_size``."""
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def tiny_gpt2_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    **overrides,
) -> GPT2Config:
    """A small ``GPT2Config`` (``Conv1D`` layers, learned positions, tied embeddings) for
    ``tokenizer``; ``intermediate_size`` defaults to GPT-2's 4x ``hidden_size``."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=num_hidden_layers,
        n_head=num_attention_heads,
        n_inner=intermediate_size or 4 * hidden_size,
        n_positions=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


TINY_FAMILIES = {"llama": tiny_llama_config, "gpt_neox": tiny_gpt_neox_config, "gpt2": tiny_gpt2_config}


def tiny_config(tokenizer: PreTrainedTokenizerBase, family: str = "llama", **shape):
    """:func:`tiny_llama_config` or :func:`tiny_gpt_neox_config`, by ``family`` name."""
    if family not in TINY_FAMILIES:
        raise HfGraftError(f"Tiny models come in the families {', '.join(TINY_FAMILIES)}, not {family!r}.")
    return TINY_FAMILIES[family](tokenizer, **shape)


def build_causal_lm(config, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of any family from its config, the same for the same ``seed``."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@dataclass(frozen=True)
class Schedule:
    """How a training loop runs: AdamW, linear warm-up, cosine decay to ``min_lr_ratio`` of the peak."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.steps >= 1 and self.batch_size >= 1 and self.learning_rate > 0):
            raise HfGraftError(f"A Schedule needs steps >= 1, batch_size >= 1 and learning_rate > 0, got {self}.")

    def factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the peak."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(
    model: PreTrainedModel,
    schedule: Schedule,
    next_batches: Callable[[torch.Generator], list[dict]],
    description: str,
    progress: bool,
    stop: Callable[[], bool] | None = None,
    check_every: int = 100,
) -> list[float]:
    """Run ``schedule``; each step's loss is the sum of the model's losses on ``next_batches(generator)``.

    Each element is a batch of model inputs (its loss is ``model(**batch).loss``) or a callable
    taking the model and returning a loss.

    ``generator`` is the loop's own, seeded by ``schedule.seed``. Every ``check_every`` steps
    ``stop()`` (if given) is asked, with the model in eval mode, whether to end early. Returns the
    loss of every step taken.
    """
    torch.manual_seed(schedule.seed)
    generator = torch.Generator().manual_seed(schedule.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    device = next(model.parameters()).device
    losses = []
    model.train()
    with tqdm(range(schedule.steps), desc=description, disable=not progress) as bar:
        for _ in bar:
            loss = sum(
                batch(model) if callable(batch) else model(**{key: value.to(device) for key, value in batch.items()}).loss
                for batch in next_batches(generator)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, schedule.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
            if stop is not None and len(losses) % check_every == 0:
                model.eval()
                if stop():
                    break
                model.train()
    model.eval()
    return losses


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """``text`` as one 1-D LongTensor of token ids, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def pretrain(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    schedule: Schedule,
    *,
    seq_len: int = 128,
    stop: Callable[[], bool] | None = None,
    check_every: int = 100,
    progress: bool = True,
) -> list[float]:
    """Language-model ``model`` on windows of ``seq_len`` tokens drawn at random from ``token_ids``.

    ``stop`` ends training early when it returns True (asked every ``check_every`` steps), e.g.
    :func:`perplexity_plateau` on validation text, so a small corpus is not memorised.
    """
    _check_text(token_ids, seq_len)
    return train_steps(
        model,
        schedule,
        lambda g: [_text_batch(token_ids, schedule.batch_size, seq_len, g)],
        "Pretraining",
        progress,
        stop,
        check_every,
    )


def _check_text(token_ids: torch.Tensor, seq_len: int) -> None:
    if not (isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1 and token_ids.numel() > seq_len):
        raise HfGraftError(f"Training text must be a 1-D tensor of more than seq_len={seq_len} token ids.")


def _text_batch(token_ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
    """``batch_size`` windows of ``seq_len`` tokens at random offsets, labelled for language modelling."""
    starts = torch.randint(0, token_ids.numel() - seq_len, (batch_size,), generator=generator)
    input_ids = torch.stack([token_ids[start : start + seq_len] for start in starts.tolist()])
    return {"input_ids": input_ids, "labels": input_ids}


def task_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for prompt + answer + eos.

    The tokenizer's special tokens begin the prompt; only the answer and the eos token are
    labelled, so the loss teaches the answer, not the prompts.
    """
    rows = []
    for prompt, answer in examples:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    return {
        "input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def example_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, batch_size: int = 32
) -> list[torch.Tensor]:
    """``input_ids`` of prompt + answer + eos per example, in ``[batch, seq]`` LongTensors without padding.

    Examples are grouped by token count (in their order within each group), so every batch holds
    sequences of one length: the inputs a calibration set or an activation probe should see.
    """
    by_length: dict[int, list[list[int]]] = {}
    for prompt, answer in examples:
        ids = tokenizer(prompt)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"]
        by_length.setdefault(len(ids) + 1, []).append(ids + [tokenizer.eos_token_id])
    return [
        torch.tensor(rows[start : start + batch_size])
        for _, rows in sorted(by_length.items())
        for start in range(0, len(rows), batch_size)
    ]


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    schedule: Schedule,
    *,
    replay_ids: torch.Tensor | None = None,
    replay_batch_size: int = 8,
    replay_reference: PreTrainedModel | None = None,
    seq_len: int = 128,
    stop: Callable[[], bool] | None = None,
    check_every: int = 100,
    progress: bool = True,
) -> list[float]:
    """Fine-tune every trainable weight of ``model`` on ``examples`` (random batches, answer-only loss).

    With ``replay_ids`` (pretraining text as token ids), each step also rehearses on
    ``replay_batch_size`` windows of ``seq_len`` tokens from it, which keeps a small model's
    general perplexity near its base's while it learns the skill: by default the language-model
    loss on those windows; with ``replay_reference`` (the base model, frozen) the KL divergence
    from the reference's next-token distributions, which holds the model to what the base predicts
    rather than re-fitting (and over-fitting) the text itself. ``stop`` ends training early when
    it returns True (asked every ``check_every`` steps), e.g. once a held-out exact match is
    reached, so the weights move no further than the skill needs.
    """
    if not examples:
        raise HfGraftError("finetune needs at least one (prompt, answer) example.")
    if replay_ids is not None:
        _check_text(replay_ids, seq_len)
    elif replay_reference is not None:
        raise HfGraftError("replay_reference needs replay_ids: the text to rehearse the reference's predictions on.")

    def batches(generator: torch.Generator) -> list:
        picks = torch.randint(0, len(examples), (schedule.batch_size,), generator=generator)
        task = task_batch(tokenizer, [examples[i] for i in picks.tolist()])
        if replay_ids is None:
            return [task]
        text = _text_batch(replay_ids, replay_batch_size, seq_len, generator)
        if replay_reference is None:
            return [task, text]
        return [task, lambda model: _kl_to_reference(model, replay_reference, text["input_ids"])]

    return train_steps(model, schedule, batches, "Fine-tuning", progress, stop, check_every)


def _kl_to_reference(model: PreTrainedModel, reference: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token ``KL(reference || model)`` of the next-token distributions on ``input_ids``."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with torch.no_grad():
        target = torch.log_softmax(reference(input_ids=input_ids).logits.float(), dim=-1).flatten(0, 1)
    predicted = torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1).flatten(0, 1)
    return torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="batchmean")


@torch.inference_mode()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy continuations of ``prompts`` up to the first eos token, batched (left-padded, KV cache)."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded])
        lengths = torch.tensor([len(ids) for ids in encoded])
        attention_mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in generated[:, width:].tolist():
            end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            answers.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return answers



def exact_match(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, batch_size: int = 256
) -> float:
    """Fraction of ``examples`` whose greedy answer is exactly the expected one, then eos.

    Generation runs one token past the longest expected answer, so an answer that goes on past
    the expected one counts as wrong. Computed by the ``exact_match`` evaluate module.
    """
    if not examples:
        raise HfGraftError("exact_match needs at least one (prompt, answer) example.")
    longest = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in examples)
    predictions = greedy_answers(
        model, tokenizer, [prompt for prompt, _ in examples], max_new_tokens=longest + 1, batch_size=batch_size
    )
    return metrics.cached("exact_match").compute(predictions=predictions, references=[a for _, a in examples])["exact_match"]


@torch.inference_mode()
def perplexity(model: PreTrainedModel, token_ids: torch.Tensor, *, seq_len: int = 128, batch_size: int = 16) -> dict:
    """Perplexity of ``model`` on ``token_ids`` cut into consecutive windows of ``seq_len`` tokens.

    Each window predicts its tokens after the first; a last window shorter than ``seq_len`` is
    dropped. Returns the ``perplexity`` evaluate module's result (``perplexity``,
    ``mean_perplexity``, ``nll_per_token``, ``num_tokens``).
    """
    windows = token_ids.numel() // seq_len
    if token_ids.dim() != 1 or windows == 0 or seq_len < 2:
        raise HfGraftError(f"perplexity needs a 1-D tensor of at least seq_len={seq_len} >= 2 token ids.")
    model.eval()
    device = next(model.parameters()).device
    chunks = token_ids[: windows * seq_len].reshape(windows, seq_len)
    nll = []
    for start in range(0, windows, batch_size):
        input_ids = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        nll += losses.double().sum(dim=1).tolist()
    return metrics.cached("perplexity").compute(nll=nll, num_tokens=[seq_len - 1] * windows)


def perplexity_plateau(model: PreTrainedModel, token_ids: torch.Tensor, *, min_gain: float = 0.01) -> Callable[[], bool]:
    """A ``stop`` for :func:`pretrain`: True once the perplexity on ``token_ids`` (validation text)
    has improved by less than ``min_gain`` (a fraction) on the best so far, i.e. the loss has flattened."""
    best = math.inf

    def stop() -> bool:
        nonlocal best
        current = perplexity(model, token_ids)["perplexity"]
        flat = current > best * (1 - min_gain)
        best = min(best, current)
        return flat

    return stop


def skill_learned(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, threshold: float = 0.95
) -> Callable[[], bool]:
    """A ``stop`` for :func:`finetune`: True once ``model``'s exact match on ``examples`` (held back
    from training) reaches ``threshold``, so the weights move no further than the skill needs."""
    if not examples:
        raise HfGraftError("skill_learned needs at least one held-back (prompt, answer) example.")
    return lambda: exact_match(model, tokenizer, examples) >= threshold
