"""SkillPacks against SVD-only, BitDelta and magnitude pruning at equal bytes, in one offline run.

1. A real skill: a tiny Llama is pretrained on CPython's pydoc text until its validation loss
   flattens (``base``), then every weight is fine-tuned on 2-digit addition (``"12+34="`` ->
   ``"46"``), with rehearsal of the pretraining text, until it is learned (``tuned``).
2. The delta ``tuned - base`` is stored at 8x, 16x and 32x fewer bytes than its bf16 size by each
   method. Per (method, ratio): skill retention ``(pack - base) / (tuned - base)`` on exact match,
   held-out perplexity and its ratio to the tuned model's, the relative Frobenius error of the
   whole delta, extraction time, apply time (load the saved pack and merge it) as a ratio to a
   plain safetensors load of the model, and, for SkillPacks, the unmerged forward as a ratio to
   the base model's.
3. Extraction time on one Llama-3-8B-shaped layer (synthetic deltas with a decaying spectrum):
   SkillPack's randomized SVD against the same allocation on full ``torch.linalg.svd``.

Writes ``skillpack.json``, ``skillpack.md`` and ``skillpack.png`` to ``--out``.

    python scripts/bench_skillpack.py --quick     # under 2 minutes on 2 CPU cores, smaller model and layer
    python scripts/bench_skillpack.py             # about 20 minutes
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be downloaded

import argparse
import copy
import inspect
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel
from safetensors.torch import load_file

import hf_graft
from hf_graft.causal_lm import (
    Schedule,
    build_causal_lm,
    encode_text,
    example_batches,
    exact_match,
    finetune,
    perplexity,
    perplexity_plateau,
    pretrain,
    skill_learned,
    tiny_llama_config,
)
from hf_graft.data import addition, corpus_tokenizer, pydoc_corpus
from hf_graft.reporting import markdown_table, save_figure, write_results
from hf_graft.safetensors_io import load_tensors, save_tensors
from hf_graft.skillpack import delta_spectrum, weight_deltas
from hf_graft.skillpack.bitpack import pack_bits, unpack_bits
from hf_graft.skillpack.compress import CandidateLadder, allocate, compress_delta
from hf_graft.skillpack.prune import SparseDelta, prune, sparse_nbytes

RATIOS = (8, 16, 32)
VALIDATION_SIZE = 200  # training-side examples held back to decide when the skill is learned
SKILL_LEARNED = 0.95  # validation exact match at which fine-tuning stops
VALIDATION_TOKENS = 10_000  # end of the training text, held back to decide when pretraining has flattened
SETUPS = {
    # quick: a smaller model, a shorter pretraining and a larger fine-tuning rate, to check the
    # whole pipeline in under 2 minutes; the figures to compare come from the full run.
    "quick": {
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "pretrain": Schedule(steps=500, batch_size=16, learning_rate=3e-3, warmup_steps=50, weight_decay=0.1),
        "finetune": Schedule(steps=1500, batch_size=64, learning_rate=3e-3, warmup_steps=50, min_lr_ratio=1.0, seed=1),
        "replay_batch_size": 4,
        "test_size": 200,
        "calibration_samples": 128,
        "layer_shapes": ((1024, 1024), (1024, 3584)),
        "timing_repeats": 3,
        "latency_repeats": 10,
    },
    "full": {
        "model": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
        "pretrain": Schedule(steps=1500, batch_size=16, learning_rate=3e-3, warmup_steps=100, weight_decay=0.1),
        "finetune": Schedule(steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100, min_lr_ratio=1.0, seed=1),
        "replay_batch_size": 8,
        "test_size": 800,
        "calibration_samples": 256,
        "layer_shapes": ((4096, 4096), (4096, 14336)),
        "timing_repeats": 9,
        "latency_repeats": 50,
    },
}
LATENCY_BATCH = (8, 128)  # sequences x tokens of held-out text per timed forward


@dataclass
class Skill:
    """The base and tuned models, the task, the evaluation text and the reference scores."""

    tokenizer: object
    base: torch.nn.Module
    tuned: torch.nn.Module
    task: object
    held_out_ids: torch.Tensor
    pretrain_steps: int
    finetune_steps: int
    base_score: float
    tuned_score: float
    base_perplexity: float
    tuned_perplexity: float


def make_skill(setup: dict, progress: bool) -> Skill:
    """Pretrain the base on the pydoc text, fine-tune a copy on addition until it is learned, score both.

    Pretraining stops once the perplexity on the held-back end of the training text improves by
    less than 1% between checks (or at the schedule's last step); fine-tuning once the exact match
    on held-back training-side examples reaches :data:`SKILL_LEARNED`. The held-out text and the
    test split are only scored.
    """
    tokenizer = corpus_tokenizer()
    corpus = pydoc_corpus()
    text_ids, held_out_ids = encode_text(tokenizer, corpus.train), encode_text(tokenizer, corpus.held_out)
    train_ids, validation_ids = text_ids[:-VALIDATION_TOKENS], text_ids[-VALIDATION_TOKENS:]
    task = addition(2, train_size=4000 + VALIDATION_SIZE, test_size=setup["test_size"])
    train, validation = task.train[:-VALIDATION_SIZE], task.train[-VALIDATION_SIZE:]
    base = build_causal_lm(tiny_llama_config(tokenizer, **setup["model"]))
    pretrain_steps = len(
        pretrain(base, train_ids, setup["pretrain"], stop=perplexity_plateau(base, validation_ids), progress=progress)
    )
    tuned = copy.deepcopy(base)
    losses = finetune(
        tuned,
        tokenizer,
        train,
        setup["finetune"],
        replay_ids=train_ids,
        replay_batch_size=setup["replay_batch_size"],
        stop=skill_learned(tuned, tokenizer, validation, threshold=SKILL_LEARNED),
        progress=progress,
    )
    return Skill(
        tokenizer=tokenizer,
        base=base,
        tuned=tuned,
        task=task,
        held_out_ids=held_out_ids,
        pretrain_steps=pretrain_steps,
        finetune_steps=len(losses),
        base_score=exact_match(base, tokenizer, task.test),
        tuned_score=exact_match(tuned, tokenizer, task.test),
        base_perplexity=perplexity(base, held_out_ids)["perplexity"],
        tuned_perplexity=perplexity(tuned, held_out_ids)["perplexity"],
    )


def flat_deltas(base: torch.nn.Module, tuned: torch.nn.Module) -> dict:
    """``{parameter name: tuned - base}`` for every changed parameter, as SkillPacks see them."""
    return {f"{name}.{part}": delta for name, parts in weight_deltas(base, tuned).items() for part, delta in parts.items()}


# Baselines. Each encodes the deltas into the tensors it stores (bytes counted exactly, every 1-D
# delta in fp16 as for SkillPacks) plus JSON metadata, and decodes them back into dense deltas.


def _dense_fp16(deltas: dict) -> tuple[dict, dict]:
    vectors = {name: d for name, d in deltas.items() if d.dim() != 2}
    return {f"{name}.delta": d.half() for name, d in vectors.items()}, {name: {"kind": "dense"} for name in vectors}


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def svd_bf16_encode(deltas: dict, budget: int) -> tuple[dict, dict]:
    """Per-matrix truncated SVD with bf16 factors (mergekit's LoRA extraction).

    Every matrix keeps the same fraction of its full rank, the largest whose bytes fit ``budget``;
    the bytes left then buy one more rank at a time where the next singular value holds the most
    energy per byte, so the factors fill the budget as the other methods do.
    """
    tensors, meta = _dense_fp16(deltas)
    matrices = {name: d for name, d in deltas.items() if d.dim() == 2}
    factors = {name: torch.linalg.svd(d, full_matrices=False) for name, d in matrices.items()}
    cost = {name: 2 * sum(d.shape) for name, d in matrices.items()}  # bf16 bytes of one more rank

    def ranks(fraction: float) -> dict:
        return {name: math.floor(fraction * min(d.shape) + 1e-9) for name, d in matrices.items()}

    def size(chosen: dict) -> int:
        return _nbytes(tensors) + sum(rank * cost[name] for name, rank in chosen.items())

    fractions = sorted({k / min(d.shape) for d in matrices.values() for k in range(min(d.shape) + 1)})
    chosen = ranks(max(f for f in fractions if size(ranks(f)) <= budget))
    left = budget - size(chosen)
    while True:
        growable = [n for n, r in chosen.items() if r < factors[n].S.numel() and cost[n] <= left]
        if not growable:
            break
        name = max(growable, key=lambda n: float(factors[n].S[chosen[n]]) ** 2 / cost[n])
        chosen[name] += 1
        left -= cost[name]
    for name, rank in chosen.items():
        u, s, vh = factors[name]
        root = s[:rank].sqrt()
        tensors[f"{name}.B"] = (u[:, :rank] * root).to(torch.bfloat16)
        tensors[f"{name}.A"] = (root[:, None] * vh[:rank]).to(torch.bfloat16)
        meta[name] = {"kind": "lowrank", "rank": rank}
    return tensors, meta


def svd_bf16_decode(tensors: dict, meta: dict) -> dict:
    """Dense deltas from :func:`svd_bf16_encode`'s tensors."""
    return {
        name: tensors[f"{name}.B"].float() @ tensors[f"{name}.A"].float()
        if info["kind"] == "lowrank"
        else tensors[f"{name}.delta"].float()
        for name, info in meta.items()
    }


def bitdelta_encode(deltas: dict, budget: int) -> tuple[dict, dict]:
    """BitDelta without scale distillation: the sign of every entry (1 bit) and one fp16 scale per
    matrix, the mean absolute delta. Its size is fixed at about 1/16 of bf16: ``budget`` is unused."""
    tensors, meta = _dense_fp16(deltas)
    for name, d in deltas.items():
        if d.dim() == 2:
            tensors[f"{name}.signs"] = pack_bits((d > 0).to(torch.uint8), 1)
            tensors[f"{name}.scale"] = d.abs().mean().reshape(1).half()
            meta[name] = {"kind": "signs", "shape": list(d.shape)}
    return tensors, meta


def bitdelta_decode(tensors: dict, meta: dict) -> dict:
    """Dense deltas from :func:`bitdelta_encode`'s tensors."""
    deltas = {}
    for name, info in meta.items():
        if info["kind"] == "signs":
            signs = unpack_bits(tensors[f"{name}.signs"], 1, math.prod(info["shape"])).float() * 2 - 1
            deltas[name] = (signs * tensors[f"{name}.scale"].float()).reshape(info["shape"])
        else:
            deltas[name] = tensors[f"{name}.delta"].float()
    return deltas


def magnitude_encode(deltas: dict, budget: int) -> tuple[dict, dict]:
    """Magnitude pruning: the largest entries over all matrices together (the least total squared
    error for a count), fp16 values and int32 indices or a bitmap per matrix, the most that fit."""
    tensors, meta = _dense_fp16(deltas)
    names = [name for name, d in deltas.items() if d.dim() == 2]
    magnitudes = torch.cat([deltas[name].abs().reshape(-1) for name in names])
    owners = torch.cat([torch.full((deltas[name].numel(),), i) for i, name in enumerate(names)])
    owners = owners[torch.argsort(magnitudes, descending=True, stable=True)]
    numels = [deltas[name].numel() for name in names]

    def counts(kept: int) -> list:
        return torch.bincount(owners[:kept], minlength=len(names)).tolist()

    def size(kept: int) -> int:
        return _nbytes(tensors) + sum(sparse_nbytes(n, c) for n, c in zip(numels, counts(kept)) if c)

    low, high = 0, owners.numel()  # the largest count that fits: size(low) <= budget < size(high + 1)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if size(middle) <= budget else (low, middle - 1)
    for name, numel, count in zip(names, numels, counts(low)):
        if count:
            sparse = prune(deltas[name], count / numel)
            tensors.update(sparse.to_tensors(name))
            meta[name] = {"kind": "sparse", **sparse.meta}
        else:
            meta[name] = {"kind": "zero", "shape": list(deltas[name].shape)}
    return tensors, meta


def magnitude_decode(tensors: dict, meta: dict) -> dict:
    """Dense deltas from :func:`magnitude_encode`'s tensors."""
    deltas = {}
    for name, info in meta.items():
        if info["kind"] == "sparse":
            sparse_meta = {key: value for key, value in info.items() if key != "kind"}
            deltas[name] = SparseDelta.from_tensors(name, tensors, sparse_meta).to_dense()
        elif info["kind"] == "zero":
            deltas[name] = torch.zeros(info["shape"])
        else:
            deltas[name] = tensors[f"{name}.delta"].float()
    return deltas


BASELINES = {
    "SVD-only bf16": (svd_bf16_encode, svd_bf16_decode),
    "BitDelta": (bitdelta_encode, bitdelta_decode),
    "magnitude pruning": (magnitude_encode, magnitude_decode),
}


def median_seconds(work: Callable, repeats: int, prepare: Callable = lambda: None) -> tuple[float, object]:
    """Median wall time of ``work(prepare())`` over ``repeats`` runs, ``prepare`` untimed, and the last result."""
    times = []
    for _ in range(repeats):
        argument = prepare()
        start = time.perf_counter()
        result = work(argument)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def plain_load_seconds(model: torch.nn.Module, folder: str, repeats: int) -> float:
    """Median time of loading ``model``'s safetensors file into a model of its shape."""
    path = os.path.join(folder, "tuned.safetensors")
    save_tensors(model.state_dict(), path)
    target = copy.deepcopy(model)
    return median_seconds(lambda _: target.load_state_dict(load_file(path)), repeats)[0]


def apply_baseline(base: torch.nn.Module, path: str, decode: Callable) -> torch.nn.Module:
    """Load a baseline's file and add its decoded deltas to ``base``'s weights in place."""
    tensors, metadata = load_tensors(path)
    parameters = dict(base.named_parameters())
    with torch.no_grad():
        for name, delta in decode(tensors, json.loads(metadata["meta"])).items():
            parameters[name] += delta
    return base


def latency_ratio(base: torch.nn.Module, adapted: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median forward time of ``adapted`` over ``base``'s, timed alternately in the same loop."""
    times = {"base": [], "adapted": []}
    with torch.inference_mode():
        for index in range(repeats + 2):
            for name, model in (("base", base), ("adapted", adapted)):
                start = time.perf_counter()
                model(input_ids=batch)
                if index >= 2:  # two warm-up passes each
                    times[name].append(time.perf_counter() - start)
    return statistics.median(times["adapted"]) / statistics.median(times["base"])


def relative_error(deltas: dict, base: torch.nn.Module, applied: torch.nn.Module) -> float:
    """``||delta - (applied - base)||_F / ||delta||_F`` over all changed parameters together."""
    base_params, applied_params = dict(base.named_parameters()), dict(applied.named_parameters())
    error = total = 0.0
    for name, delta in deltas.items():
        stored = applied_params[name].detach().float() - base_params[name].detach().float()
        error += float((delta - stored).double().square().sum())
        total += float(delta.double().square().sum())
    return math.sqrt(error / total)


@dataclass
class Bench:
    """What every (method, ratio) measurement shares."""

    skill: Skill
    setup: dict
    folder: str
    deltas: dict
    bf16_bytes: int
    load_seconds: float
    latency_batch: torch.Tensor
    calibration: list

    def fresh_base(self) -> torch.nn.Module:
        return copy.deepcopy(self.skill.base)

    def score(self, row: dict, applied: torch.nn.Module) -> dict:
        """Fill ``row`` with the applied model's skill, perplexity and delta error; return it."""
        skill = self.skill
        row["ratio"] = self.bf16_bytes / row["stored_bytes"]
        row["exact_match"] = exact_match(applied, skill.tokenizer, skill.task.test)
        row["retention"] = (row["exact_match"] - skill.base_score) / (skill.tuned_score - skill.base_score)
        row["perplexity"] = perplexity(applied, skill.held_out_ids)["perplexity"]
        row["perplexity_vs_tuned"] = row["perplexity"] / skill.tuned_perplexity
        row["relative_error"] = relative_error(self.deltas, skill.base, applied)
        return row


def skillpack_row(bench: Bench, ratio: int, calibrated: bool) -> dict:
    """Extract a SkillPack at ``ratio``, save it, time loading + merging and the unmerged forward, score it."""
    name = "SkillPack calibrated" if calibrated else "SkillPack"
    row = {"method": name, "target_ratio": ratio, "budget_bytes": math.floor(bench.bf16_bytes / ratio)}
    samples = bench.setup["calibration_samples"] if calibrated else 0
    extra = {"calibration": bench.calibration} if calibrated else {}
    start = time.perf_counter()
    pack = hf_graft.extract_skillpack(
        bench.skill.base, bench.skill.tuned, hf_graft.SkillPackConfig(target_ratio=ratio, calibration_samples=samples), **extra
    )
    row["extract_s"] = time.perf_counter() - start
    directory = os.path.join(bench.folder, f"{name.replace(' ', '-')}-{ratio}x")
    pack.save_pretrained(directory)
    row["stored_bytes"] = pack.peft_config["default"].measured["stored_bytes"]
    row["file_bytes"] = sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())
    seconds, applied = median_seconds(
        lambda base: PeftModel.from_pretrained(base, directory).merge_and_unload(),
        bench.setup["timing_repeats"],
        bench.fresh_base,
    )
    row["apply_vs_load"] = seconds / bench.load_seconds
    unmerged = PeftModel.from_pretrained(bench.fresh_base(), directory).eval()
    row["forward_vs_base"] = latency_ratio(bench.skill.base, unmerged, bench.latency_batch, bench.setup["latency_repeats"])
    return bench.score(row, applied)


def baseline_row(bench: Bench, ratio: int, name: str) -> dict:
    """Encode the delta with baseline ``name`` within the budget of ``ratio``, save it, time applying it, score it."""
    encode, decode = BASELINES[name]
    budget = math.floor(bench.bf16_bytes / ratio)
    row = {"method": name, "target_ratio": ratio, "budget_bytes": budget}
    if name == "BitDelta" and ratio != 16:
        return {**row, "note": "n/a: 1 bit per entry fixes its size near 16x"}
    start = time.perf_counter()
    tensors, meta = encode(flat_deltas(bench.skill.base, bench.skill.tuned), budget)
    row["extract_s"] = time.perf_counter() - start
    row["stored_bytes"] = _nbytes(tensors)
    if row["stored_bytes"] > budget:
        row["note"] = "own size, above the budget"
    path = os.path.join(bench.folder, f"{name.replace(' ', '-')}-{ratio}x.safetensors")
    save_tensors(tensors, path, metadata={"meta": json.dumps(meta)})
    row["file_bytes"] = os.path.getsize(path)
    seconds, applied = median_seconds(
        lambda base: apply_baseline(base, path, decode), bench.setup["timing_repeats"], bench.fresh_base
    )
    row["apply_vs_load"] = seconds / bench.load_seconds
    return bench.score(row, applied)


def evaluate_methods(skill: Skill, setup: dict, folder: str) -> list:
    """Every method at every ratio: bytes, retention, perplexity, error, extraction and apply times."""
    deltas = flat_deltas(skill.base, skill.tuned)
    bench = Bench(
        skill=skill,
        setup=setup,
        folder=folder,
        deltas=deltas,
        bf16_bytes=sum(2 * d.numel() for d in deltas.values()),
        load_seconds=plain_load_seconds(skill.tuned, folder, setup["timing_repeats"]),
        latency_batch=skill.held_out_ids[: math.prod(LATENCY_BATCH)].reshape(LATENCY_BATCH),
        calibration=example_batches(skill.tokenizer, skill.task.train[: setup["calibration_samples"]]),
    )
    can_calibrate = "calibration" in inspect.signature(hf_graft.extract_skillpack).parameters
    if not can_calibrate:
        print("SkillPack calibrated: skipped, this hf_graft.extract_skillpack takes no calibration= argument yet.")
    rows = []
    for ratio in RATIOS:
        rows.append(skillpack_row(bench, ratio, calibrated=False))
        if can_calibrate:
            rows.append(skillpack_row(bench, ratio, calibrated=True))
        else:
            rows.append({"method": "SkillPack calibrated", "target_ratio": ratio, "note": "skipped: no calibration= yet"})
        rows += [baseline_row(bench, ratio, name) for name in BASELINES]
    return rows


def synthetic_delta(rows: int, cols: int, generator: torch.Generator, decay: float = 0.995, rank: int = 1024) -> torch.Tensor:
    """A ``[rows, cols]`` delta with singular values about ``decay**i``: Gaussian factors scaled to unit
    columns are nearly orthogonal, which spares the QR. Directions past ``rank`` hold < 1e-4 of the energy."""
    k = min(rows, cols, rank)
    u = torch.randn(rows, k, generator=generator) / math.sqrt(rows)
    v = torch.randn(cols, k, generator=generator) / math.sqrt(cols)
    return (u * decay ** torch.arange(k)) @ v.T


def layer_extraction(shapes: tuple, ratio: int = 16) -> dict:
    """SkillPack allocation + compression of one layer's deltas: randomized SVD against full SVD."""
    generator = torch.Generator().manual_seed(0)
    deltas = {f"delta_{rows}x{cols}": synthetic_delta(rows, cols, generator) for rows, cols in shapes}
    result = {"shapes": [list(shape) for shape in shapes], "target_ratio": ratio}
    for method in ("randomized", "full"):
        start = time.perf_counter()
        specs = allocate(deltas, target_ratio=ratio, candidates=CandidateLadder(method=method))
        packed = {name: compress_delta(d, specs[name], method=method) for name, d in deltas.items()}
        result[f"{method}_s"] = time.perf_counter() - start
        error = sum(float((d - packed[name].delta()).double().square().sum()) for name, d in deltas.items())
        result[f"{method}_relative_error"] = math.sqrt(error / sum(float(d.double().square().sum()) for d in deltas.values()))
        result[f"{method}_stored_bytes"] = sum(p.nbytes for p in packed.values())
    result["speedup"] = result["full_s"] / result["randomized_s"]
    return result


def curve_plot(curves: dict, path: str, *, x: str, y: str, title: str) -> str:
    """One line per entry of ``curves`` (label -> list of ``(x, y)``), log-2 x axis, as PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def targets(rows: list, layer: dict) -> list:
    """The targets, each with what this run measured."""
    scored = [row for row in rows if "retention" in row]

    def row_of(method: str, ratio: int):
        return next((row for row in scored if row["method"] == method and row["target_ratio"] == ratio), None)

    found = []
    for method in ("SkillPack", "SkillPack calibrated"):
        at16, at32 = row_of(method, 16), row_of(method, 32)
        if at16 is None:
            continue
        rivals = [row for row in scored if row["target_ratio"] == 16 and not row["method"].startswith("SkillPack")]
        margin = at16["retention"] - max(row["retention"] for row in rivals)
        found += [
            {"target": f"{method}: retention >= 99% at 16x", "measured": f"{at16['retention']:.1%}", "met": at16["retention"] >= 0.99},
            {"target": f"{method}: above every baseline at 16x", "measured": f"{margin:+.1%} over the best", "met": margin > 0},
            {"target": f"{method}: retention >= 97% at 32x", "measured": f"{at32['retention']:.1%}", "met": at32["retention"] >= 0.97},
            {"target": f"{method}: unmerged forward <= 1.15x the base (16x)", "measured": f"{at16['forward_vs_base']:.2f}x", "met": at16["forward_vs_base"] <= 1.15},
        ]
    equal = abs(layer["randomized_relative_error"] - layer["full_relative_error"]) <= 0.01
    found.append(
        {
            "target": "layer extraction >= 5x faster than full SVD at equal error",
            "measured": f"{layer['speedup']:.2f}x (errors {layer['randomized_relative_error']:.4f} vs {layer['full_relative_error']:.4f})",
            "met": layer["speedup"] >= 5 and equal,
        }
    )
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, shorter training, smaller layer (under 2 minutes)")
    parser.add_argument("--out", default="bench_results/skillpack")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    setup = SETUPS[mode]
    started = time.perf_counter()

    skill = make_skill(setup, progress=True)
    shape = delta_spectrum(weight_deltas(skill.base, skill.tuned))
    parameters = sum(p.numel() for p in skill.base.parameters())
    print(
        f"base ({skill.pretrain_steps} steps): exact match {skill.base_score:.3f}, perplexity {skill.base_perplexity:.2f}; "
        f"tuned ({skill.finetune_steps} steps): exact match {skill.tuned_score:.3f}, perplexity {skill.tuned_perplexity:.2f} "
        f"({skill.tuned_perplexity / skill.base_perplexity:.3f}x the base's); delta energy in the top 1% / 10% "
        f"of singular values: {shape['energy_top1pct']:.1%} / {shape['energy_top10pct']:.1%}"
    )
    if skill.tuned_score <= skill.base_score:
        raise hf_graft.HfGraftError("The fine-tune did not learn the skill: no retention can be measured; train longer.")
    folder = os.path.join(args.out, "packs")
    os.makedirs(folder, exist_ok=True)
    rows = evaluate_methods(skill, setup, folder)
    print(f"Timing one layer's extraction, shapes {setup['layer_shapes']} ({'quick: smaller than' if args.quick else 'as in'} Llama-3-8B)")
    layer = layer_extraction(setup["layer_shapes"])
    found = targets(rows, layer)

    models = [
        {"model": "base (pretrained)", "parameters": parameters, "exact_match": skill.base_score, "perplexity": skill.base_perplexity},
        {"model": "tuned (addition)", "parameters": parameters, "exact_match": skill.tuned_score, "perplexity": skill.tuned_perplexity},
    ]
    columns = [
        "method", "target_ratio", "ratio", "stored_bytes", "file_bytes", "exact_match", "retention", "perplexity",
        "perplexity_vs_tuned", "relative_error", "extract_s", "apply_vs_load", "forward_vs_base", "note",
    ]
    layer_row = {key: value for key, value in layer.items() if key != "shapes"}
    layer_row["shapes"] = " + ".join(f"{r}x{c}" for r, c in layer["shapes"])
    markdown = (
        f"# SkillPack benchmark ({mode}, {args.threads} threads)\n\n"
        f"Tiny Llama ({parameters:,} parameters, {setup['model']}) pretrained on pydoc text for "
        f"{skill.pretrain_steps} steps (until the validation perplexity flattened, at most {setup['pretrain'].steps}), "
        f"then every weight fine-tuned on 2-digit addition with rehearsal for "
        f"{skill.finetune_steps} steps (until {SKILL_LEARNED:.0%} exact match on held-back examples, at most "
        f"{setup['finetune'].steps}). Delta energy in the top 1% / 10% of singular values: "
        f"{shape['energy_top1pct']:.1%} / {shape['energy_top10pct']:.1%}.\n\n"
        + markdown_table(models)
        + "\n\n## Methods at equal bytes\n\nratio = bf16 bytes of the delta / stored tensor bytes; retention = "
        "(pack - base) / (tuned - base) on exact match; apply = load the saved pack and merge, over a plain "
        "safetensors load of the model; forward = unmerged PeftModel over the base.\n\n"
        + markdown_table(rows, columns)
        + f"\n\n## One layer's extraction ({'quick: smaller shapes than' if args.quick else 'shapes of'} Llama-3-8B)\n\n"
        + markdown_table([layer_row])
        + "\n\n## Targets\n\n"
        + markdown_table(found, ["target", "measured", "met"])
        + f"\n\nWall time: {time.perf_counter() - started:.0f} s.\n\n![retention vs compression](skillpack.png)\n"
    )
    data = {"mode": mode, "threads": args.threads, "parameters": parameters, "pretrain_steps": skill.pretrain_steps, "finetune_steps": skill.finetune_steps, "spectrum": shape, "models": models, "rows": rows, "layer": layer, "targets": found}
    write_results(args.out, "skillpack", data, markdown)
    curves = {}
    for row in rows:
        if "retention" in row:
            curves.setdefault(row["method"], []).append((row["ratio"], row["retention"]))
    curve_plot(curves, os.path.join(args.out, "skillpack.png"), x="compression ratio (bf16 delta / stored bytes)", y="skill retention", title="Skill retention at equal bytes")
    print(markdown)


if __name__ == "__main__":
    main()
