"""Gated grafts: train a graft's gate to open on its task and close elsewhere, and measure how far it opens.

A gated graft (``GraftedModelForCausalLM.from_models(..., gate=True)``) replaces the host's stream
by ``h + g(h) * (graft(h) - h)``. :func:`train_gate` fits ``g`` with everything else frozen, on two
kinds of batches: on the task's, the grafted model should predict what it predicts with the gate
wide open (the graft's own behaviour); on general text, what the host predicts on its own. Both
are next-token KL divergences, so the gate learns where the graft changes the model's predictions.
Each target is met exactly by one openness (1 on the task, 0 on general text), so the openness is
also pulled there directly (binary cross-entropy, weight ``openness_weight``): where the graft
would change nothing either way, the gate still shuts off the task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import HfGraftError

__all__ = ["gate_openness", "record_openness", "train_gate"]

#: A gate counts as open on a token above this openness.
OPEN = 0.5


def _gated_block(grafted, graft: int):
    blocks = grafted.graft_blocks
    if not 0 <= graft < len(blocks):
        raise HfGraftError(f"graft must be between 0 and {len(blocks) - 1}, got {graft}.")
    block = blocks[graft]
    if block.gate is None:
        raise HfGraftError(f"Graft {graft} has no gate: graft it with gate=True.")
    return block


@contextlib.contextmanager
def _wide_open(block):
    gate, block.gate = block.gate, None
    try:
        yield
    finally:
        block.gate = gate


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions."""
    student, teacher = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    return F.kl_div(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), log_target=True, reduction="batchmean")


def train_gate(
    grafted,
    *,
    host,
    task_data: Sequence[torch.Tensor],
    general_data: Sequence[torch.Tensor],
    graft: int = 0,
    steps: int = 300,
    learning_rate: float = 5e-2,
    openness_weight: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train graft ``graft``'s gate, everything else frozen.

    ``task_data`` and ``general_data`` are ``input_ids`` batches of the graft's task and of general
    text; ``host`` is the host model alone. Each step takes one batch of each: on the task, the
    KL from the model with the gate wide open; on general text, the KL from the host. Returns the
    summed loss before and after training (``{"first": ..., "last": ...}``).
    """
    if openness_weight < 0:
        raise HfGraftError(f"openness_weight must be >= 0, got {openness_weight}.")
    if not task_data or not general_data:
        raise HfGraftError("train_gate needs task batches and general-text batches (input_ids).")
    block = _gated_block(grafted, graft)
    trainable = {name: p.requires_grad for name, p in grafted.named_parameters()}
    grafted.requires_grad_(False)
    block.gate.requires_grad_(True)
    optimizer = torch.optim.Adam(block.gate.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    was_training = grafted.training
    grafted.eval()
    host.eval()
    history, seen = [], []
    handle = block.gate.register_forward_hook(lambda _, args, output: seen.append(output))
    try:
        for _ in tqdm(range(steps), desc="Training the graft's gate", disable=not progress):
            task = task_data[int(torch.randint(0, len(task_data), (1,), generator=generator))]
            general = general_data[int(torch.randint(0, len(general_data), (1,), generator=generator))]
            with torch.no_grad(), _wide_open(block):
                task_target = grafted(input_ids=task).logits
            with torch.no_grad():
                general_target = host(input_ids=general).logits
            seen.clear()
            value = _kl(grafted(input_ids=task).logits, task_target) + _kl(grafted(input_ids=general).logits, general_target)
            opened, shut = (g.float().clamp(1e-6, 1 - 1e-6) for g in seen)
            value = value + openness_weight * (F.binary_cross_entropy(opened, torch.ones_like(opened))
                                               + F.binary_cross_entropy(shut, torch.zeros_like(shut)))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            history.append(value.item())
    finally:
        handle.remove()
        for name, parameter in grafted.named_parameters():
            parameter.requires_grad_(trainable[name])
        grafted.train(was_training)
    return {"first": history[0], "last": history[-1]}


@torch.no_grad()
def gate_openness(grafted, data: Sequence[torch.Tensor], graft: int = 0) -> dict:
    """How far graft ``graft``'s gate opens over the tokens of ``data`` (``input_ids`` batches, padding
    included as given): ``{"mean": ..., "open_share": share of tokens above 0.5, "tokens": ...}``."""
    block = _gated_block(grafted, graft)
    seen = []
    handle = block.gate.register_forward_hook(lambda _, args, output: seen.append(output.detach().float().reshape(-1).cpu()))
    was_training = grafted.training
    grafted.eval()
    try:
        for batch in data:
            grafted(input_ids=batch)
    finally:
        handle.remove()
        grafted.train(was_training)
    if not seen:
        raise HfGraftError("gate_openness needs at least one batch of input_ids.")
    values = torch.cat(seen)
    return {"mean": float(values.mean()), "open_share": float((values > OPEN).float().mean()), "tokens": int(values.numel())}


def record_openness(grafted, task_data: Sequence[torch.Tensor], general_data: Sequence[torch.Tensor], graft: int = 0) -> dict:
    """:func:`gate_openness` on the task's batches and on general text, stored in the graft's config
    entry (``openness``: saved with the model, shown on its card) and returned."""
    openness = {"task": gate_openness(grafted, task_data, graft), "general": gate_openness(grafted, general_data, graft)}
    grafted.config.grafts[graft]["openness"] = openness
    return openness
