"""Fitting and training the translators around a grafted block, in the paper's two stages.

1. **pre-translator**: the grafted block should receive what it received in its donor, so
   ``pre(h_host)`` is matched to the donor's input to block ``donor_layer`` on the same tokens;
2. **post-translator**: the host's next block should receive what it expects, so
   ``post(block(pre(h_host)))`` is matched to the host's own stream at the graft's position.

Losses: ``"residual"`` (mean squared error between the two streams), ``"residual_kl"`` (the KL
divergence the paper names, taken per token over the hidden dimensions of the residual vectors
turned into distributions by a softmax: ``KL(softmax(target) || softmax(output))``), and
``"logits"`` (per token, ``KL`` between next-token distributions: the grafted model against the
donor for the pre stage, against the host for the post stage). With the residual losses every
model is frozen, so the streams are computed once and each stage fits one linear map on them.
Only the stage's translator is ever updated.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..causal_lm import encode_text, example_batches
from ..data import Task
from ..errors import HfGraftError
from ..models.modeling_grafted_causal_lm import GraftedModelForCausalLM, decoder_layers

__all__ = ["LOSSES", "fit_translators", "train_translators", "translator_batches"]

LOSSES = ("residual", "residual_kl", "logits")
DATA = ("task", "corpus", "mixed")


def translator_batches(
    tokenizer,
    data: str,
    *,
    task: Task | None = None,
    corpus: str | None = None,
    batches: int = 32,
    batch_size: int = 16,
    seq_len: int = 64,
    seed: int = 0,
) -> list:
    """``input_ids`` batches to train translators on: the task's prompts and answers, corpus text, or both.

    ``"task"`` takes ``task.train`` examples (prompt + answer, batches of one length);
    ``"corpus"`` takes windows of ``seq_len`` tokens at random offsets of ``corpus``;
    ``"mixed"`` takes half of each.
    """
    if data not in DATA:
        raise HfGraftError(f"Translator data must be one of {DATA}, got {data!r}.")
    if data in ("task", "mixed") and task is None:
        raise HfGraftError(f"Translator data {data!r} needs task=.")
    if data in ("corpus", "mixed") and not corpus:
        raise HfGraftError(f"Translator data {data!r} needs corpus= text.")
    generator = torch.Generator().manual_seed(seed)
    wanted = {"task": batches, "corpus": 0, "mixed": batches // 2}[data]
    result = []
    if wanted:
        pool = example_batches(tokenizer, task.train, batch_size=batch_size)
        order = torch.randperm(len(pool), generator=generator).tolist()
        result += [pool[order[i % len(pool)]] for i in range(wanted)]
    if batches - wanted:
        ids = encode_text(tokenizer, corpus)
        if ids.numel() <= seq_len:
            raise HfGraftError(f"The corpus holds {ids.numel()} tokens, fewer than one window of {seq_len}.")
        for _ in range(batches - wanted):
            starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator).tolist()
            result.append(torch.stack([ids[s : s + seq_len] for s in starts]))
    return result


@contextmanager
def _capture(module: nn.Module, store: list, what: str):
    """Record ``module``'s hidden-state input (``what="input"``) or output on every call."""

    def on_input(mod, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach())

    def on_output(mod, args, output):
        store.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = (
        module.register_forward_pre_hook(on_input, with_kwargs=True)
        if what == "input"
        else module.register_forward_hook(on_output)
    )
    try:
        yield store
    finally:
        handle.remove()


@torch.no_grad()
def _stream(model: nn.Module, module: nn.Module, what: str, batches: Sequence) -> torch.Tensor:
    """``[tokens, hidden]``: ``module``'s input or output over all batches run through ``model``."""
    store: list = []
    model.eval()
    with _capture(module, store, what):
        for batch in batches:
            model(input_ids=batch)
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in store]).float()


def _host_stream(host: nn.Module, position: int, batches: Sequence) -> torch.Tensor:
    """The host's residual stream where a graft at ``position`` sits: the input of host block ``position``."""
    blocks = decoder_layers(host)
    if position < len(blocks):
        return _stream(host, blocks[position], "input", batches)
    return _stream(host, blocks[-1], "output", batches)


def _check(grafted, donor, host, graft: int, batches: Sequence) -> dict:
    if not isinstance(grafted, GraftedModelForCausalLM):
        raise HfGraftError("Translators belong to a GraftedModelForCausalLM; build one with from_models.")
    if not 0 <= graft < len(grafted.config.grafts):
        raise HfGraftError(f"The model has {len(grafted.config.grafts)} graft(s); graft {graft} does not exist.")
    if not batches:
        raise HfGraftError("Translator training needs at least one batch of input_ids.")
    spec = grafted.config.grafts[graft]
    donor_blocks = decoder_layers(donor)
    if spec["donor_layer"] >= len(donor_blocks) or donor.config.hidden_size != spec["donor_config"]["hidden_size"]:
        raise HfGraftError("The donor passed is not the model this graft's block came from (layers or width differ).")
    if host.config.hidden_size != grafted.config.host_config["hidden_size"]:
        raise HfGraftError("The host passed is not this graft's host (hidden sizes differ).")
    return spec


def _least_squares(inputs: torch.Tensor, targets: torch.Tensor, layer: nn.Linear, ridge: float) -> None:
    """Set ``layer`` (weight and bias) to the ridge-regularised least-squares map ``inputs -> targets``."""
    ones = torch.ones(len(inputs), 1, dtype=torch.float64)
    design = torch.cat([inputs.double(), ones], dim=1)
    gram = design.T @ design
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ targets.double())
    with torch.no_grad():
        layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
        layer.bias.copy_(solution[-1].to(layer.bias.dtype))


def fit_translators(grafted, *, donor, host, data: Sequence, graft: int = 0, ridge: float = 1e-4) -> None:
    """Initialise graft ``graft``'s translators by least squares on paired activations over ``data``.

    The pre-translator maps the grafted model's stream at the graft to the donor's input of the
    block; then the post-translator maps the block's output to the host's stream there. Works for
    any pair of hidden sizes.
    """
    spec = _check(grafted, donor, host, graft, data)
    block = grafted.graft_blocks[graft]
    entering = _stream(grafted, block, "input", data)
    _least_squares(entering, _stream(donor, decoder_layers(donor)[spec["donor_layer"]], "input", data), block.pre, ridge)
    _least_squares(_stream(grafted, block.block, "output", data), _host_stream(host, spec["position"], data), block.post, ridge)


def _distance(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "residual":
        return F.mse_loss(output, target)
    return F.kl_div(F.log_softmax(output.float(), -1), F.log_softmax(target.float(), -1), log_target=True, reduction="batchmean")


def _fit_on_streams(layer: nn.Linear, inputs, targets, loss, steps, learning_rate, batch_tokens, seed, progress, desc):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(layer.parameters(), lr=learning_rate)
    history = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        picks = torch.randint(0, len(inputs), (min(batch_tokens, len(inputs)),), generator=generator)
        value = _distance(layer(inputs[picks]), targets[picks], loss)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        history.append(value.item())
    with torch.no_grad():
        return {"first": history[0], "last": _distance(layer(inputs), targets, loss).item()}


def _fit_on_logits(grafted, layer, reference, data, steps, learning_rate, seed, progress, desc):
    with torch.no_grad():
        targets = [reference(input_ids=batch).logits for batch in data]
    optimizer = torch.optim.Adam(layer.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        pick = int(torch.randint(0, len(data), (1,), generator=generator))
        logits = grafted(input_ids=data[pick]).logits
        value = _distance(logits.reshape(-1, logits.shape[-1]), targets[pick].reshape(-1, logits.shape[-1]), "logits")
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        history.append(value.item())
    return {"first": history[0], "last": history[-1]}


def train_translators(
    grafted,
    *,
    donor,
    host,
    data: Sequence,
    loss: str = "residual",
    graft: int = 0,
    stages: Sequence[str] = ("pre", "post"),
    steps: int = 300,
    learning_rate: float = 1e-3,
    batch_tokens: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train graft ``graft``'s translators, stage by stage, with everything else frozen.

    ``data`` are ``input_ids`` batches (:func:`translator_batches`). Returns, per stage, the loss
    before and after training (``{"pre": {"first": ..., "last": ...}, "post": ...}``).
    """
    if loss not in LOSSES:
        raise HfGraftError(f"loss must be one of {LOSSES}, got {loss!r}.")
    unknown = set(stages) - {"pre", "post"}
    if unknown or not stages:
        raise HfGraftError(f"stages must name 'pre' and/or 'post', got {list(stages)!r}.")
    spec = _check(grafted, donor, host, graft, data)
    block = grafted.graft_blocks[graft]
    trainable = {name: p.requires_grad for name, p in grafted.named_parameters()}
    grafted.requires_grad_(False)
    donor.eval()
    host.eval()
    results = {}
    try:
        for stage in ("pre", "post"):
            if stage not in stages:
                continue
            layer = block.pre if stage == "pre" else block.post
            layer.requires_grad_(True)
            desc = f"Training the {stage}-translator ({loss})"
            if loss == "logits":
                grafted.eval()
                reference = donor if stage == "pre" else host
                results[stage] = _fit_on_logits(grafted, layer, reference, data, steps, learning_rate, seed, progress, desc)
            elif stage == "pre":
                inputs = _stream(grafted, block, "input", data)
                targets = _stream(donor, decoder_layers(donor)[spec["donor_layer"]], "input", data)
                results[stage] = _fit_on_streams(layer, inputs, targets, loss, steps, learning_rate, batch_tokens, seed, progress, desc)
            else:
                inputs = _stream(grafted, block.block, "output", data)
                targets = _host_stream(host, spec["position"], data)
                results[stage] = _fit_on_streams(layer, inputs, targets, loss, steps, learning_rate, batch_tokens, seed, progress, desc)
            layer.requires_grad_(False)
    finally:
        for name, parameter in grafted.named_parameters():
            parameter.requires_grad_(trainable[name])
        grafted.eval()
    return results
