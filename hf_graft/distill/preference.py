"""Stage 1 of GraftLLM with trl: supervised fine-tuning on the teacher's answers, then DPO.

:func:`sft` trains the student on ``(prompt, completion)`` rows with trl's ``SFTTrainer``; the
prompt-completion format puts the loss on the completion (the teacher's answer and eos) only.
:func:`dpo` then runs trl's ``DPOTrainer`` on rows whose chosen answer is the teacher's and whose
rejected answer is the student's own, so the student is pushed off the mistakes it still makes.
Both take the student's own tokenizer: answers arrive as text, whatever tokenizer the teacher had.

Batch sizes are global (the sum over processes); under ``accelerate launch`` the trainers split
them across processes. Trainer checkpoints pickle their optimizer state, so these stages save no
intermediate checkpoint: a recipe reruns an unfinished SFT or DPO stage from its start.
"""

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_callback import ProgressCallback

from ..data import Example
from ..errors import HfGraftError

__all__ = ["DpoSettings", "SftSettings", "StageResult", "dpo", "sft"]


@dataclass(frozen=True)
class SftSettings:
    """Supervised fine-tuning on the teacher's answers.

    Args:
        steps: optimizer steps.
        batch_size: examples per step, summed over processes.
        learning_rate: AdamW peak rate (linear decay after ``warmup_steps``).
        warmup_steps: linear warm-up steps.
        max_length: longest prompt + answer in tokens; longer rows are truncated.
        seed: seeds the data order and initialisation-free randomness.
    """

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    max_length: int = 256
    seed: int = 0

    def __post_init__(self):
        _check_common(self)


@dataclass(frozen=True)
class DpoSettings:
    """Direct preference optimisation: teacher's answer chosen, the student's own rejected.

    Args:
        steps, batch_size, learning_rate, warmup_steps, max_length, seed: as in :class:`SftSettings`.
        beta: DPO's inverse temperature: how far the student may move from its SFT self (the
            frozen reference); trl's default 0.1.
        loss_type: trl's DPO loss (``"sigmoid"`` is the paper's).
    """

    steps: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    max_length: int = 256
    seed: int = 0
    beta: float = 0.1
    loss_type: str = "sigmoid"

    def __post_init__(self):
        _check_common(self)
        if not self.beta > 0:
            raise HfGraftError(f"DPO's beta must be positive, got {self.beta!r}.")


@dataclass
class StageResult:
    """A trained student and the loss it logged at every step."""

    model: PreTrainedModel
    losses: list[float]


def _check_common(settings) -> None:
    name = type(settings).__name__
    for field in ("steps", "batch_size", "max_length"):
        value = getattr(settings, field)
        if not (isinstance(value, int) and value >= 1):
            raise HfGraftError(f"{name}.{field} must be a positive integer, got {value!r}.")
    if not (isinstance(settings.learning_rate, (int, float)) and settings.learning_rate > 0):
        raise HfGraftError(f"{name}.learning_rate must be positive, got {settings.learning_rate!r}.")
    if not (isinstance(settings.warmup_steps, int) and settings.warmup_steps >= 0):
        raise HfGraftError(f"{name}.warmup_steps must be a non-negative integer, got {settings.warmup_steps!r}.")


def _per_device_batch(batch_size: int) -> int:
    processes = PartialState().num_processes
    if batch_size % processes:
        raise HfGraftError(
            f"batch_size={batch_size} does not split evenly over {processes} processes; use a multiple of {processes}."
        )
    return batch_size // processes


def _trainer_args(config_class, settings, output_dir: str, progress: bool, **extra):
    if not torch.cuda.is_available():  # trl defaults to bf16, which a CPU run must turn off
        extra.update(use_cpu=True, bf16=False)
    return config_class(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=_per_device_batch(settings.batch_size),
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        max_length=settings.max_length,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=max(1, settings.steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        **extra,
    )


class _LossInTheBar(ProgressCallback):
    """transformers' progress bar, with the logged loss in the bar instead of a printed dict per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


@contextlib.contextmanager
def _quiet_trainer():
    """No per-row progress bars from datasets' preprocessing, no deprecation notices of trl's own defaults."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
            yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _train(trainer) -> None:
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_LossInTheBar())
    trainer.train()


def _losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise HfGraftError("The student's tokenizer needs a pad token and an eos token; set them before training.")


def sft(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: SftSettings = SftSettings(),
    *,
    output_dir: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Fine-tune ``student`` in place on ``(prompt, answer)`` pairs with trl's ``SFTTrainer``.

    The loss covers the answer and the eos token trl appends, not the prompt. ``output_dir``
    receives the trainer's logs (a temporary folder when None); the weights are not saved here.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise HfGraftError("SFT needs at least one (prompt, answer) example.")
    _check_tokenizer(tokenizer)
    dataset = Dataset.from_dict({"prompt": [p for p, _ in examples], "completion": [a for _, a in examples]})
    with _work_dir(output_dir) as work, _quiet_trainer():
        args = _trainer_args(SFTConfig, settings, work, progress, completion_only_loss=True)
        trainer = SFTTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
        _train(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    return StageResult(model=model, losses=_losses(trainer))


def dpo(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict],
    settings: DpoSettings = DpoSettings(),
    *,
    output_dir: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Train ``student`` in place with trl's ``DPOTrainer`` on ``{"prompt", "chosen", "rejected"}`` rows.

    The reference model is a frozen copy of ``student`` as it is now (after SFT), so DPO moves it
    only as far as ``settings.beta`` allows. ``pairs`` usually come from
    :func:`~hf_graft.distill.preference_pairs`.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise HfGraftError(
            "DPO needs at least one preference pair; the student already answers every prompt as the teacher does."
        )
    _check_tokenizer(tokenizer)
    dataset = Dataset.from_dict({key: [row[key] for row in pairs] for key in ("prompt", "chosen", "rejected")})
    reference = copy.deepcopy(student).eval()
    with _work_dir(output_dir) as work, _quiet_trainer():
        args = _trainer_args(DPOConfig, settings, work, progress, beta=settings.beta, loss_type=settings.loss_type)
        trainer = DPOTrainer(
            model=student, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        _train(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    return StageResult(model=model, losses=_losses(trainer))


class _work_dir:
    """``output_dir`` (created), or a temporary folder removed afterwards."""

    def __init__(self, output_dir: str | None):
        self.output_dir = output_dir
        self.temporary = None

    def __enter__(self) -> str:
        if self.output_dir is not None:
            os.makedirs(self.output_dir, exist_ok=True)
            return self.output_dir
        self.temporary = tempfile.TemporaryDirectory(prefix="hf-graft-trainer-")
        return self.temporary.name

    def __exit__(self, *exc):
        if self.temporary is not None:
            self.temporary.cleanup()
