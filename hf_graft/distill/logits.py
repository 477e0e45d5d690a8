"""Logit distillation for a teacher and a student that share a tokenizer, in a plain accelerate loop.

The student learns the teacher's whole next-token distribution, not only its greedy answer: the
loss is KL(teacher || student) of temperature-softened distributions (times T^2, as Hinton et al.)
at every prompt and answer token, averaged over the tokens of the global batch.

The loop is written for ``accelerate launch``: the model, optimizer and data are ``prepare``-d,
token counts are summed over processes so that every process's loss is scaled by the *global*
token count (DDP then averages gradients into exactly the single-process gradient of the same
global batch), and logged losses are ``gather``-ed. Batches are drawn from a fixed permutation per
epoch, so step ``k`` sees the same examples however many processes run and whether or not the run
was interrupted. Every ``checkpoint_every`` steps the run is saved with
:mod:`hf_graft.checkpoint` (safetensors + JSON, no pickle); a rerun resumes from it and continues
bit for bit as the uninterrupted run would have.
"""

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..causal_lm import Schedule
from ..checkpoint import load_training_state, save_from_main
from ..data import Example
from ..errors import HfGraftError

__all__ = ["LogitResult", "LogitSettings", "check_shared_vocabulary", "distill_logits", "token_kl"]

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class LogitSettings:
    """Logit distillation.

    Args:
        steps: optimizer steps.
        batch_size: sequences per step, summed over processes (the global batch); it must split
            evenly over the processes.
        learning_rate, warmup_steps, min_lr_ratio, weight_decay, max_grad_norm: AdamW with linear
            warm-up and cosine decay, as :class:`hf_graft.causal_lm.Schedule`.
        temperature: softmax temperature of both distributions; 1 matches them as they are.
        checkpoint_every: save a resumable checkpoint every this many steps (0: only at the end).
        seed: seeds the data order.
    """

    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise HfGraftError(f"checkpoint_every must be a non-negative integer, got {self.checkpoint_every!r}.")
        if not self.temperature > 0:
            raise HfGraftError(f"temperature must be positive, got {self.temperature!r}.")
        self.schedule()

    def schedule(self) -> Schedule:
        """The learning-rate schedule these settings describe (checks them, too)."""
        return Schedule(
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
        )


@dataclass
class LogitResult:
    """The distilled student (unwrapped, in eval mode) and the global loss of every step."""

    model: PreTrainedModel
    losses: list[float]


def check_shared_vocabulary(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise :class:`HfGraftError` unless the two models' logits index the same tokens.

    Logit distillation compares distributions token by token, so the output layers must be
    equally wide and, when both tokenizers are given, the vocabularies identical.
    """
    widths = [model.get_output_embeddings().weight.shape[0] for model in (teacher, student)]
    problem = None
    if widths[0] != widths[1]:
        problem = f"the teacher predicts {widths[0]} tokens and the student {widths[1]}"
    elif teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            problem = "their tokenizers map tokens to different ids"
    if problem:
        raise HfGraftError(
            f"Logit distillation needs a teacher and a student with one vocabulary, but {problem}. "
            "Use the sft/dpo stages instead: they pass answers as text and work across tokenizers."
        )


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position of temperature-softened next-token distributions, ``[batch, seq]``."""
    student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1)


def _sequences(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> TensorDataset:
    """Prompt + answer + eos per example, right-padded to the longest, with attention masks.

    One padded width for the whole set keeps every sequence's computation the same whichever
    batch, and whichever process, it lands in.
    """
    rows = [
        tokenizer(prompt)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for prompt, answer in examples
    ]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return TensorDataset(input_ids, attention_mask)


def distill_logits(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: LogitSettings = LogitSettings(),
    *,
    output_dir: str | os.PathLike | None = None,
    resume: bool = True,
    accelerator: Accelerator | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> LogitResult:
    """Train ``student`` (in place) to match ``teacher``'s next-token distributions on ``examples``.

    ``examples`` are ``(prompt, answer)`` pairs, usually the teacher's own answers; both models
    read them with ``tokenizer``. With ``output_dir``, a checkpoint is kept in
    ``<output_dir>/checkpoint`` every ``settings.checkpoint_every`` steps and at the end, and with
    ``resume`` a run restarts from it. ``on_step(step, loss)`` is called after every step (the
    loss is the global batch's). Returns the student and every step's loss (those before a resume
    included).
    """
    if not examples:
        raise HfGraftError("Logit distillation needs at least one (prompt, answer) example.")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise HfGraftError("The tokenizer needs a pad token and an eos token; set them before distilling.")
    check_shared_vocabulary(teacher, student)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    processes = accelerator.num_processes
    if settings.batch_size % processes:
        raise HfGraftError(
            f"batch_size={settings.batch_size} does not split evenly over {processes} processes; "
            f"use a multiple of {processes}."
        )
    steps_per_epoch = len(examples) // settings.batch_size
    if steps_per_epoch == 0:
        raise HfGraftError(
            f"Logit distillation got {len(examples)} examples, fewer than one batch of {settings.batch_size}; "
            "give more prompts or a smaller batch_size."
        )
    dataset = _sequences(tokenizer, examples)
    schedule = settings.schedule()
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    checkpoint = os.path.join(output_dir, CHECKPOINT_DIR) if output_dir is not None else None
    state = {"step": 0, "losses": [], "settings": asdict(settings), "examples": len(examples)}
    if resume and checkpoint is not None and os.path.isdir(checkpoint):
        saved = load_training_state(checkpoint, student, optimizer, scheduler)
        if (saved.get("settings"), saved.get("examples")) != (state["settings"], state["examples"]):
            raise HfGraftError(
                f"{checkpoint} was written by a run with other settings or data; delete it to start over, "
                "or resume with the settings it was saved with."
            )
        state = saved
        accelerator.print(f"Logit distillation: resumed from {checkpoint} after step {state['step']}")

    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    student, optimizer = accelerator.prepare(student, optimizer)
    per_process = settings.batch_size if accelerator.split_batches else settings.batch_size // processes
    temperature = settings.temperature
    bar = tqdm(
        total=settings.steps,
        initial=state["step"],
        desc="Logit distillation",
        disable=not (progress and accelerator.is_main_process),
    )
    while state["step"] < settings.steps:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch))
        order = order[offset * settings.batch_size : steps_per_epoch * settings.batch_size].tolist()
        loader = accelerator.prepare(DataLoader(dataset, batch_size=per_process, sampler=order))
        student.train()
        for input_ids, attention_mask in loader:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
            mask = attention_mask.to(torch.float32)
            local = (token_kl(student_logits, teacher_logits, temperature) * mask).sum() * temperature**2
            tokens = accelerator.reduce(mask.sum(), reduction="sum")
            accelerator.backward(local * processes / tokens)
            if schedule.max_grad_norm:
                accelerator.clip_grad_norm_(student.parameters(), schedule.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(accelerator.gather(local.detach().reshape(1)).sum() / tokens)
            state["step"] += 1
            state["losses"].append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if checkpoint is not None and (
                state["step"] == settings.steps
                or (settings.checkpoint_every and state["step"] % settings.checkpoint_every == 0)
            ):
                save_from_main(accelerator, checkpoint, student, optimizer, scheduler, state)
            if on_step is not None:
                on_step(state["step"], loss)
            if state["step"] == settings.steps:
                break
    bar.close()
    return LogitResult(model=accelerator.unwrap_model(student).eval(), losses=list(state["losses"]))
