"""SkillPacks against Delta-CoMe, BitDelta, SVD-only, magnitude pruning and DARE at equal file bytes.

1. Two real skills on one base: a tiny Llama is pretrained on CPython's pydoc text until its
   validation loss flattens, then fine-tuned twice on 2-digit addition (``"12+34="`` -> ``"46"``)
   with rehearsal of the pretraining text, until it is learned: ``full`` (learning rate 1e-3,
   language-model loss on the rehearsed text) and ``gentle`` (3e-4, rehearsal as KL to the base's
   own predictions, which keeps the general perplexity within a few percent of the base's).
2. Each delta is stored by every method in at most ``bf16 bytes / ratio`` bytes of files, at
   ratios 8, 16, 32 and 64, headers and metadata included. SkillPacks and the anchors that
   calibrate get the same calibration data: the skill's own training examples.
3. Per (fine-tune, method, ratio): skill retention ``(pack - base) / (tuned - base)`` on exact
   match, held-out perplexity, the relative Frobenius error of the whole delta, file bytes and
   extraction time. An ablation switches off, in turn, each of the SkillPack's objective, formats,
   compensation and scale distillation.

Writes ``skillpack.json``, ``skillpack.md`` and ``skillpack.png`` to ``--out``.

    python scripts/bench_skillpack.py --quick     # a few minutes on 2 CPU cores: a smaller model
    python scripts/bench_skillpack.py             # about 40 minutes
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be downloaded

import argparse
import copy
import math
import re
import time
from dataclasses import dataclass

import torch
from peft import PeftModel

import delta_anchors
import hf_graft
from hf_graft.causal_lm import (
    Schedule,
    build_causal_lm,
    encode_text,
    exact_match,
    finetune,
    perplexity,
    perplexity_plateau,
    pretrain,
    skill_learned,
    task_batch,
    tiny_llama_config,
)
from hf_graft.data import addition, corpus_tokenizer, pydoc_corpus
from hf_graft.reporting import markdown_table, save_figure, write_results
from hf_graft.skillpack import delta_spectrum, weight_deltas
from hf_graft.skillpack.compression.calibrate import input_hessians

RATIOS = (8, 16, 32, 64)
ABLATIONS = {
    "SkillPack - objective (weight error)": {"objective": "weight"},
    "SkillPack - formats (low rank only)": {"formats": "lowrank"},
    "SkillPack - compensation": {"compensation": False},
    "SkillPack - scale distillation": {"distill_steps": 0},
}
VALIDATION_SIZE = 200  # training-side examples held back to decide when the skill is learned
SKILL_LEARNED = 0.95  # validation exact match at which fine-tuning stops
VALIDATION_TOKENS = 10_000  # end of the training text, held back to decide when pretraining has flattened
SETUPS = {
    "quick": {
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "pretrain": Schedule(steps=500, batch_size=16, learning_rate=3e-3, warmup_steps=50, weight_decay=0.1),
        "finetunes": {
            "full": (Schedule(steps=1500, batch_size=64, learning_rate=3e-3, warmup_steps=50, min_lr_ratio=1.0, seed=1), 4, False),
        },
        "test_size": 200,
        "calibration_examples": 256,
        "ratios": (16, 32),
        "ablation_ratios": (16,),
    },
    "full": {
        "model": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
        "pretrain": Schedule(steps=1500, batch_size=16, learning_rate=3e-3, warmup_steps=100, weight_decay=0.1),
        "finetunes": {  # (schedule, rehearsal batch size, rehearse against the base's predictions)
            "full": (Schedule(steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100, min_lr_ratio=1.0, seed=1), 8, False),
            "gentle": (Schedule(steps=6000, batch_size=64, learning_rate=3e-4, warmup_steps=100, min_lr_ratio=1.0, seed=1), 8, True),
        },
        "test_size": 800,
        "calibration_examples": 1024,
        "ratios": RATIOS,
        "ablation_ratios": (16, 32),
    },
}


@dataclass
class Skill:
    """A base, one fine-tune of it, the task, the evaluation text and the reference scores."""

    name: str
    tokenizer: object
    base: torch.nn.Module
    tuned: torch.nn.Module
    task: object
    held_out_ids: torch.Tensor
    finetune_steps: int
    base_score: float
    tuned_score: float
    base_perplexity: float
    tuned_perplexity: float

    def calibration(self, examples: int) -> list:
        """The skill's own training examples as labelled batches (only the answers supervised)."""
        train = self.task.train[:examples]
        return [task_batch(self.tokenizer, train[i : i + 32]) for i in range(0, len(train), 32)]


def make_skills(setup: dict, progress: bool) -> tuple[list, int]:
    """Pretrain the base once, fine-tune it once per schedule of ``setup["finetunes"]``, score everything."""
    tokenizer = corpus_tokenizer()
    corpus = pydoc_corpus()
    text_ids, held_out_ids = encode_text(tokenizer, corpus.train), encode_text(tokenizer, corpus.held_out)
    train_ids, validation_ids = text_ids[:-VALIDATION_TOKENS], text_ids[-VALIDATION_TOKENS:]
    task = addition(2, train_size=4000 + VALIDATION_SIZE, test_size=setup["test_size"])
    train, validation = task.train[:-VALIDATION_SIZE], task.train[-VALIDATION_SIZE:]
    base = build_causal_lm(tiny_llama_config(tokenizer, **setup["model"]))
    steps = len(pretrain(base, train_ids, setup["pretrain"], stop=perplexity_plateau(base, validation_ids), progress=progress))
    base_score, base_perplexity = exact_match(base, tokenizer, task.test), perplexity(base, held_out_ids)["perplexity"]
    skills = []
    for name, (schedule, rehearsal, to_base) in setup["finetunes"].items():
        tuned = copy.deepcopy(base)
        losses = finetune(
            tuned, tokenizer, train, schedule, replay_ids=train_ids, replay_batch_size=rehearsal,
            replay_reference=base if to_base else None,
            stop=skill_learned(tuned, tokenizer, validation, threshold=SKILL_LEARNED), progress=progress,
        )
        skills.append(Skill(
            name, tokenizer, base, tuned, task, held_out_ids, len(losses), base_score,
            exact_match(tuned, tokenizer, task.test), base_perplexity, perplexity(tuned, held_out_ids)["perplexity"],
        ))
    return skills, steps


def flat_deltas(base: torch.nn.Module, tuned: torch.nn.Module) -> dict:
    """``{parameter name: tuned - base}`` for every changed parameter, as SkillPacks see them."""
    return {f"{name}.{part}": delta for name, parts in weight_deltas(base, tuned).items() for part, delta in parts.items()}


def score(skill: Skill, row: dict, deltas: dict, applied: torch.nn.Module, bf16_bytes: int) -> dict:
    """Fill ``row`` with the applied model's skill, perplexity and delta error; return it."""
    base_params, applied_params = dict(skill.base.named_parameters()), dict(applied.named_parameters())
    error = total = 0.0
    for name, delta in deltas.items():
        stored = applied_params[name].detach().float() - base_params[name].detach().float()
        error += float((delta - stored).double().square().sum())
        total += float(delta.double().square().sum())
    row["ratio"] = bf16_bytes / row["file_bytes"]
    row["exact_match"] = exact_match(applied, skill.tokenizer, skill.task.test)
    row["retention"] = (row["exact_match"] - skill.base_score) / (skill.tuned_score - skill.base_score)
    row["perplexity"] = perplexity(applied, skill.held_out_ids)["perplexity"]
    row["relative_error"] = math.sqrt(error / total)
    return row


def skillpack_row(skill: Skill, folder: str, method: str, ratio: int, calibration: list, bf16_bytes: int, deltas: dict, **settings) -> dict:
    """Extract, save, load and merge a SkillPack at ``ratio``; score it."""
    row = {"fine-tune": skill.name, "method": method, "target_ratio": ratio, "budget_bytes": bf16_bytes // ratio}
    config = hf_graft.SkillPackConfig(target_ratio=ratio, calibration_samples=sum(len(b["input_ids"]) for b in calibration), **settings)
    start = time.perf_counter()
    pack = hf_graft.extract_skillpack(skill.base, skill.tuned, config, calibration=calibration, progress=False)
    row["extract_s"] = time.perf_counter() - start
    directory = os.path.join(folder, f"{skill.name}-{re.sub('[^A-Za-z0-9]+', '_', method)}-{ratio}x")
    pack.save_pretrained(directory)
    row["file_bytes"] = sum(os.path.getsize(os.path.join(directory, f)) for f in ("adapter_config.json", "adapter_model.safetensors"))
    specs = pack.peft_config["default"].module_specs
    kinds = {}
    for parts in specs.values():
        for meta in parts.values():
            kind = meta["kind"] + (f"{meta['bits']}" if meta["kind"] == "quant" else "") + ("+lr" if meta["kind"] == "quant" and "rank" in meta else "")
            kinds[kind] = kinds.get(kind, 0) + 1
    row["note"] = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    applied = PeftModel.from_pretrained(copy.deepcopy(skill.base), directory).merge_and_unload()
    return score(skill, row, deltas, applied, bf16_bytes)


def anchor_row(skill: Skill, folder: str, method: str, ratio: int, encode, bf16_bytes: int, deltas: dict) -> dict:
    """Encode with an anchor at the budget of ``ratio`` (shrinking the tensor budget until the file fits), score it."""
    budget = bf16_bytes // ratio
    row = {"fine-tune": skill.name, "method": method, "target_ratio": ratio, "budget_bytes": budget}
    path = os.path.join(folder, f"{skill.name}-{re.sub('[^A-Za-z0-9]+', '_', method)}-{ratio}x.safetensors")
    start = time.perf_counter()
    target = budget
    for _ in range(8):
        encoded = encode(deltas, target)
        size = encoded.save(path)
        if size <= budget or "own size" in encoded.note:
            break
        target -= size - budget + 64
    row["extract_s"] = time.perf_counter() - start
    row["file_bytes"] = size
    row["note"] = encoded.note + (" over the budget" if size > budget and not encoded.note else "")
    applied = copy.deepcopy(skill.base)
    parameters = dict(applied.named_parameters())
    with torch.no_grad():
        for name, delta in encoded.deltas.items():
            parameters[name] += delta.to(parameters[name].dtype)
    return score(skill, row, deltas, applied, bf16_bytes)


def bitdelta_distiller(skill: Skill, calibration: list, steps: int = 200):
    """BitDelta's scale distillation: per-matrix scales trained by AdamW (lr 1e-4) on logit MSE."""

    def distill(signs: dict, scales: dict) -> dict:
        parameters = dict(skill.base.named_parameters())
        trainable = {name: [torch.tensor(float(s), requires_grad=True) for s in values] for name, values in scales.items()}
        optimizer = torch.optim.AdamW([p for values in trainable.values() for p in values], lr=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in calibration]
        with torch.no_grad():
            targets = [skill.tuned(**batch).logits.float() for batch in inputs]
        for step in range(steps):
            batch, target = inputs[step % len(inputs)], targets[step % len(inputs)]
            replaced = {name: parameters[name].detach() + sum(c * s for c, s in zip(trainable[name], signs[name])) for name in trainable}
            logits = torch.func.functional_call(skill.base, replaced, args=(), kwargs=batch).logits.float()
            loss = torch.nn.functional.mse_loss(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        return trainable

    return distill


def anchors(skill: Skill, calibration: list) -> dict:
    """The anchors' encoders, each ``(deltas, budget) -> Encoded``."""
    modules = [name for name, module in skill.tuned.named_modules() if isinstance(module, torch.nn.Linear)]
    widths = {name: skill.tuned.get_submodule(name).in_features for name in modules}
    inputs = [b["input_ids"] for b in calibration]
    hessians = {f"{name}.weight": h for name, h in input_hessians(skill.tuned, widths, inputs, progress=False)}
    distill = bitdelta_distiller(skill, calibration)
    return {
        "Delta-CoMe (8/3/2, GPTQ)": lambda deltas, budget: delta_anchors.delta_come(deltas, budget, hessians),
        "BitDelta (+ scale distillation)": lambda deltas, budget: delta_anchors.bitdelta(deltas, budget, distill),
        "SVD-only bf16": delta_anchors.svd_bf16,
        "magnitude pruning": delta_anchors.magnitude,
        "DARE": delta_anchors.dare,
    }


def evaluate(skill: Skill, setup: dict, folder: str, ablations: bool) -> list:
    deltas = flat_deltas(skill.base, skill.tuned)
    bf16_bytes = sum(2 * d.numel() for d in deltas.values())
    calibration = skill.calibration(setup["calibration_examples"])
    encoders = anchors(skill, calibration)
    rows = []
    for ratio in setup["ratios"]:
        rows.append(skillpack_row(skill, folder, "SkillPack", ratio, calibration, bf16_bytes, deltas))
        print(f"{skill.name} {ratio}x SkillPack: retention {rows[-1]['retention']:.3f} ({rows[-1]['extract_s']:.0f} s)", flush=True)
        if ablations and ratio in setup["ablation_ratios"]:
            for method, settings in ABLATIONS.items():
                rows.append(skillpack_row(skill, folder, method, ratio, calibration, bf16_bytes, deltas, **settings))
        for method, encode in encoders.items():
            rows.append(anchor_row(skill, folder, method, ratio, encode, bf16_bytes, deltas))
        print(markdown_table([r for r in rows if r["target_ratio"] == ratio], ["method", "file_bytes", "retention", "note"]), flush=True)
    return rows


def targets(rows: list, ratios: tuple) -> list:
    """The targets, each with what this run measured."""
    found = []
    for tune in sorted({row["fine-tune"] for row in rows}):
        def at(method, ratio):
            return next((r for r in rows if r["fine-tune"] == tune and r["method"] == method and r["target_ratio"] == ratio), None)

        for ratio, goal in ((16, 0.95), (32, 0.80)):
            row = at("SkillPack", ratio)
            if row:
                found.append({"target": f"{tune}: retention >= {goal:.0%} at {ratio}x", "measured": f"{row['retention']:.1%}", "met": row["retention"] >= goal})
        for ratio in ratios:
            ours = at("SkillPack", ratio)
            rivals = [r for r in rows if r["fine-tune"] == tune and r["target_ratio"] == ratio and not r["method"].startswith("SkillPack")
                      and r["file_bytes"] <= r["budget_bytes"]]
            if not ours or not rivals:
                continue
            best = max(rivals, key=lambda r: r["retention"])
            found.append({"target": f"{tune}: above every anchor at {ratio}x", "measured": f"{ours['retention']:.1%} vs {best['method']} {best['retention']:.1%}", "met": ours["retention"] > best["retention"]})
            if ratio >= 32:
                factor = ours["retention"] / best["retention"] if best["retention"] > 0 else math.inf
                found.append({"target": f"{tune}: >= 1.2x the best anchor at {ratio}x", "measured": f"{factor:.2f}x", "met": factor >= 1.2})
        row = at("SkillPack", 16)
        if row:
            found.append({"target": f"{tune}: extraction at 16x under 10 minutes", "measured": f"{row['extract_s']:.0f} s", "met": row["extract_s"] < 600})
    return found


def plot(rows: list, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tunes = sorted({row["fine-tune"] for row in rows})
    fig, axes = plt.subplots(1, len(tunes), figsize=(6.4 * len(tunes), 4.4), dpi=120, squeeze=False)
    for ax, tune in zip(axes[0], tunes):
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if not m.startswith("SkillPack -")]
        for method in methods:
            points = sorted({(r["ratio"], r["retention"]) for r in rows if r["fine-tune"] == tune and r["method"] == method})
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=method, linewidth=2.5 if method == "SkillPack" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["target_ratio"] for r in rows}), [f"{r}x" for r in sorted({r["target_ratio"] for r in rows})])
        ax.set_xlabel("bf16 delta bytes / file bytes (each point at its own file size)")
        ax.set_ylabel("skill retention")
        ax.set_title(f"{tune} fine-tune")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and one fine-tune, to check the pipeline")
    parser.add_argument("--out", default="bench_results/skillpack")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    setup = SETUPS[mode]
    started = time.perf_counter()
    skills, pretrain_steps = make_skills(setup, progress=True)
    folder = os.path.join(args.out, "packs")
    os.makedirs(folder, exist_ok=True)
    models, rows = [], []
    for index, skill in enumerate(skills):
        if skill.tuned_score <= skill.base_score:
            raise hf_graft.HfGraftError(f"The {skill.name} fine-tune did not learn the skill; train longer.")
        spectrum = delta_spectrum(weight_deltas(skill.base, skill.tuned))
        models.append({
            "fine-tune": skill.name, "steps": skill.finetune_steps, "base exact match": skill.base_score,
            "tuned exact match": skill.tuned_score, "base perplexity": skill.base_perplexity,
            "tuned perplexity": skill.tuned_perplexity, "perplexity vs base": skill.tuned_perplexity / skill.base_perplexity,
            "energy top 1%": spectrum["energy_top1pct"], "energy top 10%": spectrum["energy_top10pct"],
        })
        print(markdown_table(models[-1:]), flush=True)
        rows += evaluate(skill, setup, folder, ablations=index == 0)
    found = targets(rows, setup["ratios"])
    parameters = sum(p.numel() for p in skills[0].base.parameters())
    columns = ["fine-tune", "method", "target_ratio", "file_bytes", "ratio", "exact_match", "retention", "perplexity",
               "relative_error", "extract_s", "note"]
    main_rows = [r for r in rows if not r["method"].startswith("SkillPack -")]
    ablation_rows = [r for r in rows if r["method"].startswith("SkillPack") and r["fine-tune"] == skills[0].name and r["target_ratio"] in setup["ablation_ratios"]]
    markdown = (
        f"# SkillPack benchmark ({mode}, {args.threads} threads)\n\n"
        f"Tiny Llama ({parameters:,} parameters, {setup['model']}) pretrained on pydoc text for {pretrain_steps} steps "
        f"(until the validation perplexity flattened), then fine-tuned on 2-digit addition with rehearsal until "
        f"{SKILL_LEARNED:.0%} exact match on held-back examples. Every method stores the delta in at most "
        f"bf16 bytes / ratio bytes of files (headers and metadata included); SkillPacks, Delta-CoMe's GPTQ and "
        f"BitDelta's distillation use the same {setup['calibration_examples']} training examples of the skill.\n\n"
        + markdown_table(models)
        + "\n\n## Methods at equal file bytes\n\nratio = bf16 bytes of the delta / file bytes; retention = "
        "(pack - base) / (tuned - base) on exact match over the test split.\n\n"
        + markdown_table(main_rows, columns)
        + f"\n\n## Ablation ({skills[0].name} fine-tune)\n\n"
        + markdown_table(ablation_rows, ["method", "target_ratio", "file_bytes", "retention", "perplexity", "relative_error", "extract_s"])
        + "\n\n## Targets\n\n"
        + markdown_table(found, ["target", "measured", "met"])
        + f"\n\nWall time: {time.perf_counter() - started:.0f} s.\n\n![retention vs compression](skillpack.png)\n"
    )
    data = {"mode": mode, "threads": args.threads, "parameters": parameters, "pretrain_steps": pretrain_steps,
            "models": models, "rows": rows, "targets": found}
    write_results(args.out, "skillpack", data, markdown)
    plot(rows, os.path.join(args.out, "skillpack.png"))
    print(markdown)


if __name__ == "__main__":
    main()
