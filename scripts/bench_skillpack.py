"""SkillPacks against Delta-CoMe, BitDelta, SVD (as mergekit-extract-lora), magnitude pruning and DARE at equal file bytes.

1. One setup per run (``--setup``): a small model of one family and tokenizer is pretrained on
   CPython's pydoc text until its validation loss flattens, then fine-tuned on a skill (2-digit
   addition, ``"12+34="`` -> ``"46"``, or string reversal) until it is learned, twice: ``plain``
   (learning rate 1e-3; without rehearsal, or, on ``llama-addition``, ``full`` rehearsing the
   pretraining text) and ``gentle`` (3e-4, rehearsal as KL to the base's own predictions). Setups:
   ``neox-addition`` (byte-level GPT-NeoX, where the defaults were chosen), ``llama-addition``
   and ``gpt2-reversal`` (GPT-2's ``Conv1D`` and tied embeddings), reported untouched.
2. Each delta is stored by every method in at most ``bf16 bytes / ratio`` bytes of files, at
   ratios 8, 16, 32 and 64, headers and metadata included: SkillPacks made from the skill's
   examples, from samples of the tuned model (no data given) and data-free; Delta-CoMe (GPTQ on
   the examples, and round-to-nearest data-free), BitDelta (scales distilled on the examples, and
   data-free), SVD with bf16 factors, magnitude pruning and DARE.
3. Per (fine-tune, method, ratio): skill retention ``(pack - base) / (tuned - base)`` on exact
   match, general perplexity on held-out text beside the tuned model's, the relative Frobenius
   error of the whole delta, file bytes and the metadata's share, extraction time. An ablation
   switches off, in turn, general text, the output objective, the formats, compensation and
   scale distillation of the pack made from examples.

Models are cached in ``--out``/models and reused. Writes ``skillpack.json``, ``skillpack.md`` and
``skillpack.png`` to ``--out``.

    python scripts/bench_skillpack.py --setup quick            # a few minutes on 2 CPU cores
    python scripts/bench_skillpack.py --setup neox-addition    # about an hour, training included
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
    tiny_config,
    encode_text,
    exact_match,
    finetune,
    perplexity,
    perplexity_plateau,
    pretrain,
    skill_learned,
    task_batch,
)
from hf_graft.data import addition, corpus_tokenizer, pydoc_corpus, reversal
from hf_graft.model_cache import cached_model
from hf_graft.reporting import markdown_table, save_figure, write_results
from hf_graft.skillpack import delta_spectrum, weight_deltas
from hf_graft.skillpack.compression.calibrate import input_hessians
from transformers.pytorch_utils import Conv1D

RATIOS = (8, 16, 32, 64)
ABLATIONS = {  # each new part of the SkillPack switched off in turn, on the skill's examples
    "SkillPack (examples) - general text": {"general_text": False},
    "SkillPack (examples) - objective (weight error)": {"objective": "weight"},
    "SkillPack (examples) - formats (low rank only)": {"formats": "lowrank"},
    "SkillPack (examples) - compensation": {"compensation": False},
    "SkillPack (examples) - scale distillation": {"distill_steps": 0},
}
VALIDATION_SIZE = 200  # training-side examples held back to decide when the skill is learned
SKILL_LEARNED = 0.95  # validation exact match at which fine-tuning stops
VALIDATION_TOKENS = 10_000  # end of the training text, held back to decide when pretraining has flattened
SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}
PRETRAIN = Schedule(steps=1500, batch_size=16, learning_rate=3e-3, warmup_steps=100, weight_decay=0.1)
PLAIN = Schedule(steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100, min_lr_ratio=1.0, seed=1)
GENTLE = Schedule(steps=6000, batch_size=64, learning_rate=3e-4, warmup_steps=100, min_lr_ratio=1.0, seed=1)
SKILLS = {
    "addition": lambda test_size: addition(2, train_size=4000 + VALIDATION_SIZE, test_size=test_size),
    "reversal": lambda test_size: reversal(train_size=4000 + VALIDATION_SIZE, test_size=test_size),
}
#: Each setup: a model family and tokenizer, a skill, and fine-tunes as (schedule, rehearsal), the
#: rehearsal of the pretraining text being none, its language-model loss ("text") or the KL to the
#: base's own predictions ("base"). Defaults are chosen on ``neox-addition``; the others are reported untouched.
SETUPS = {
    "neox-addition": {"family": "gpt_neox", "vocab": 258, "skill": "addition", "model": SHAPE,
                      "finetunes": {"plain": (PLAIN, None), "gentle": (GENTLE, "base")}},
    "llama-addition": {"family": "llama", "vocab": 512, "skill": "addition", "model": SHAPE,
                       "finetunes": {"full": (PLAIN, "text"), "gentle": (GENTLE, "base")}},
    "gpt2-reversal": {"family": "gpt2", "vocab": 512, "skill": "reversal", "model": SHAPE,
                      "finetunes": {"plain": (PLAIN, None), "gentle": (GENTLE, "base")}},
    "quick": {"family": "llama", "vocab": 512, "skill": "addition", "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
              "pretrain": Schedule(steps=500, batch_size=16, learning_rate=3e-3, warmup_steps=50, weight_decay=0.1),
              "finetunes": {"full": (Schedule(steps=1500, batch_size=64, learning_rate=3e-3, warmup_steps=50, min_lr_ratio=1.0, seed=1), "text")},
              "test_size": 200, "examples": 256, "ratios": (16, 32), "ablation_ratios": (16,)},
}
CHOSEN_ON = "neox-addition"


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


def make_skills(name: str, setup: dict, cache: str, progress: bool) -> tuple[list, int]:
    """Pretrain the base once, fine-tune it once per schedule of ``setup["finetunes"]``, score
    everything; every model is kept in ``cache`` and reused by a later run of the same settings."""
    tokenizer = corpus_tokenizer(setup["vocab"])
    corpus = pydoc_corpus()
    text_ids, held_out_ids = encode_text(tokenizer, corpus.train), encode_text(tokenizer, corpus.held_out)
    train_ids, validation_ids = text_ids[:-VALIDATION_TOKENS], text_ids[-VALIDATION_TOKENS:]
    task = SKILLS[setup["skill"]](setup.get("test_size", 800))
    train, validation = task.train[:-VALIDATION_SIZE], task.train[-VALIDATION_SIZE:]
    settings = {"family": setup["family"], "vocab": setup["vocab"], "shape": setup["model"]}
    schedule = setup.get("pretrain", PRETRAIN)

    def pretrained():
        model = build_causal_lm(tiny_config(tokenizer, setup["family"], **setup["model"]))
        return model, {"steps": len(pretrain(model, train_ids, schedule, stop=perplexity_plateau(model, validation_ids), progress=progress))}

    base, info, _ = cached_model(os.path.join(cache, "base"), {**settings, "pretrain": str(schedule)}, pretrained, tokenizer=tokenizer)
    base_score, base_perplexity = exact_match(base, tokenizer, task.test), perplexity(base, held_out_ids)["perplexity"]
    skills = []
    for tune, (finetune_schedule, rehearsal) in setup["finetunes"].items():
        def tuned_model():
            tuned = copy.deepcopy(base)
            losses = finetune(
                tuned, tokenizer, train, finetune_schedule, replay_ids=train_ids if rehearsal else None, replay_batch_size=8,
                replay_reference=base if rehearsal == "base" else None,
                stop=skill_learned(tuned, tokenizer, validation, threshold=SKILL_LEARNED), progress=progress,
            )
            return tuned, {"steps": len(losses)}

        tune_settings = {**settings, "skill": setup["skill"], "schedule": str(finetune_schedule), "rehearsal": rehearsal}
        tuned, tune_info, _ = cached_model(os.path.join(cache, tune), tune_settings, tuned_model, tokenizer=tokenizer)
        skills.append(Skill(
            tune, tokenizer, base, tuned, task, held_out_ids, tune_info["steps"], base_score,
            exact_match(tuned, tokenizer, task.test), base_perplexity, perplexity(tuned, held_out_ids)["perplexity"],
        ))
    return skills, info["steps"]


def flat_deltas(base: torch.nn.Module, tuned: torch.nn.Module) -> dict:
    """``{parameter name: tuned - base}`` for every changed parameter, as SkillPacks see them."""
    return {f"{name}.{part}": delta for name, parts in weight_deltas(base, tuned).items() for part, delta in parts.items()}


def score(skill: Skill, row: dict, deltas: dict, applied: torch.nn.Module, bf16_bytes: int) -> dict:
    """Fill ``row`` with the applied model's skill, general perplexity (beside the tuned model's) and delta error; return it."""
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
    row["tuned_perplexity"] = skill.tuned_perplexity
    row["relative_error"] = math.sqrt(error / total)
    return row


def skillpack_row(skill: Skill, folder: str, method: str, ratio: int, calibration, bf16_bytes: int, deltas: dict, **settings) -> dict:
    """Extract, save, load and merge a SkillPack at ``ratio``; score it. ``calibration`` is the
    skill's batches, ``"generate"`` or ``None`` (data-free)."""
    row = {"fine-tune": skill.name, "method": method, "target_ratio": ratio, "budget_bytes": bf16_bytes // ratio}
    samples = sum(len(b["input_ids"]) for b in calibration) if isinstance(calibration, list) else 128
    config = hf_graft.SkillPackConfig(target_ratio=ratio, calibration_samples=samples, **settings)
    start = time.perf_counter()
    pack = hf_graft.extract_skillpack(skill.base, skill.tuned, config, calibration=calibration, tokenizer=skill.tokenizer, progress=False)
    row["extract_s"] = time.perf_counter() - start
    directory = os.path.join(folder, f"{skill.name}-{re.sub('[^A-Za-z0-9]+', '_', method)}-{ratio}x")
    pack.save_pretrained(directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    with open(weights, "rb") as handle:
        header = 8 + int.from_bytes(handle.read(8), "little")
    config_bytes = os.path.getsize(os.path.join(directory, "adapter_config.json"))
    row["file_bytes"] = config_bytes + os.path.getsize(weights)
    row["metadata_share"] = (config_bytes + header) / row["file_bytes"]
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
    """The anchors' encoders, each ``(deltas, budget) -> Encoded``; the data-free ones first."""
    modules = [name for name, module in skill.tuned.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]
    widths = {name: _in_features(skill.tuned.get_submodule(name)) for name in modules}
    inputs = [b["input_ids"] for b in calibration]
    hessians = {f"{name}.weight": h for name, h in input_hessians(skill.tuned, widths, inputs, progress=False)}
    transposed = frozenset(f"{name}.weight" for name in modules if isinstance(skill.tuned.get_submodule(name), Conv1D))
    distill = bitdelta_distiller(skill, calibration)
    return {
        "Delta-CoMe (RTN, data-free)": lambda deltas, budget: delta_anchors.delta_come(deltas, budget, {}),
        "BitDelta (data-free)": lambda deltas, budget: delta_anchors.bitdelta(deltas, budget, lambda signs, scales: scales),
        "SVD bf16 (mergekit-extract-lora)": delta_anchors.svd_bf16,
        "magnitude pruning": delta_anchors.magnitude,
        "DARE": delta_anchors.dare,
        "Delta-CoMe (GPTQ, examples)": lambda deltas, budget: delta_anchors.delta_come(deltas, budget, hessians, transposed),
        "BitDelta (+ distillation, examples)": lambda deltas, budget: delta_anchors.bitdelta(deltas, budget, distill),
    }


DATA_FREE_ANCHORS = ("Delta-CoMe (RTN, data-free)", "BitDelta (data-free)", "SVD bf16 (mergekit-extract-lora)")
SKILLPACKS = {"SkillPack (examples)": "examples", "SkillPack (generated)": "generate", "SkillPack (data-free)": None}


def _in_features(module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def evaluate(skill: Skill, setup: dict, folder: str, ablations: bool) -> list:
    deltas = flat_deltas(skill.base, skill.tuned)
    bf16_bytes = sum(2 * d.numel() for d in deltas.values())
    examples = skill.calibration(setup.get("examples", 512))
    encoders = anchors(skill, examples)
    rows = []
    for ratio in setup.get("ratios", RATIOS):
        for method, calibration in SKILLPACKS.items():
            rows.append(skillpack_row(skill, folder, method, ratio, examples if calibration == "examples" else calibration, bf16_bytes, deltas))
            print(f"{skill.name} {ratio}x {method}: retention {rows[-1]['retention']:.3f}, perplexity {rows[-1]['perplexity']:.3f} "
                  f"({rows[-1]['extract_s']:.0f} s)", flush=True)
        if ablations and ratio in setup.get("ablation_ratios", (16, 32)):
            for method, settings in ABLATIONS.items():
                rows.append(skillpack_row(skill, folder, method, ratio, examples, bf16_bytes, deltas, **settings))
        for method, encode in encoders.items():
            rows.append(anchor_row(skill, folder, method, ratio, encode, bf16_bytes, deltas))
        print(markdown_table([r for r in rows if r["target_ratio"] == ratio], ["method", "file_bytes", "retention", "perplexity", "note"]), flush=True)
    return rows


def targets(rows: list, ratios: tuple) -> list:
    """The targets, each with what this run measured."""
    found = []
    for tune in sorted({row["fine-tune"] for row in rows}):
        def at(method, ratio):
            return next((r for r in rows if r["fine-tune"] == tune and r["method"] == method and r["target_ratio"] == ratio), None)

        def check(method, ratio, goal):
            row = at(method, ratio)
            if row:
                found.append({"target": f"{tune}: {method} >= {goal:.0%} at {ratio}x", "measured": f"{row['retention']:.1%} (perplexity {row['perplexity']:.3f})",
                              "met": row["retention"] >= goal})

        check("SkillPack (examples)", 16, 0.95)
        check("SkillPack (examples)", 32, 0.85)
        row = at("SkillPack (examples)", 16)
        if row:
            tuned = row["tuned_perplexity"]
            found.append({"target": f"{tune}: general perplexity at 16x (examples) within 5% of the tuned model's",
                          "measured": f"{row['perplexity']:.3f} vs {tuned:.3f} ({row['perplexity'] / tuned:.3f}x)", "met": row["perplexity"] <= 1.05 * tuned})
        check("SkillPack (generated)", 16, 0.90)
        check("SkillPack (generated)", 32, 0.70)
        for ratio in ratios:
            ours = at("SkillPack (data-free)", ratio)
            rivals = [r for r in rows if r["fine-tune"] == tune and r["target_ratio"] == ratio and r["method"] in DATA_FREE_ANCHORS
                      and r["file_bytes"] <= r["budget_bytes"]]
            if ours and rivals:
                best = max(rivals, key=lambda r: r["retention"])
                found.append({"target": f"{tune}: data-free at or above every data-free anchor at {ratio}x",
                              "measured": f"{ours['retention']:.1%} vs {best['method']} {best['retention']:.1%}", "met": ours["retention"] >= best["retention"]})
        row = at("SkillPack (examples)", 32)
        if row:
            found.append({"target": f"{tune}: metadata <= 3% of a 32x pack", "measured": f"{row['metadata_share']:.2%}", "met": row["metadata_share"] <= 0.03})
    return found


def plot(rows: list, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tunes = sorted({row["fine-tune"] for row in rows})
    fig, axes = plt.subplots(1, len(tunes), figsize=(6.4 * len(tunes), 4.4), dpi=120, squeeze=False)
    for ax, tune in zip(axes[0], tunes):
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if " - " not in m]
        for method in methods:
            points = sorted({(r["ratio"], r["retention"]) for r in rows if r["fine-tune"] == tune and r["method"] == method})
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=method, linewidth=2.5 if method.startswith("SkillPack") else 1.2)
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
    parser.add_argument("--setup", choices=sorted(SETUPS), default=CHOSEN_ON, help=f"model, tokenizer and skill (defaults were chosen on {CHOSEN_ON})")
    parser.add_argument("--out", help="results folder (default bench_results/skillpack-SETUP)")
    parser.add_argument("--ratios", help="comma-separated ratios (default 8,16,32,64)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = dict(SETUPS[args.setup])
    if args.ratios:
        setup["ratios"] = tuple(int(r) for r in args.ratios.split(","))
    out = args.out or f"bench_results/skillpack-{args.setup}"
    started = time.perf_counter()
    skills, pretrain_steps = make_skills(args.setup, setup, os.path.join(out, "models"), progress=True)
    folder = os.path.join(out, "packs")
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
        rows += evaluate(skill, setup, folder, ablations=index == 0 and not args.no_ablation)
    ratios = setup.get("ratios", RATIOS)
    found = targets(rows, ratios)
    parameters = sum(p.numel() for p in skills[0].base.parameters())
    columns = ["fine-tune", "method", "target_ratio", "file_bytes", "ratio", "exact_match", "retention", "perplexity",
               "relative_error", "metadata_share", "extract_s", "note"]
    main_rows = [r for r in rows if " - " not in r["method"]]
    ablation_rows = [r for r in rows if r["method"].startswith("SkillPack (examples)") and r["fine-tune"] == skills[0].name
                     and r["target_ratio"] in setup.get("ablation_ratios", (16, 32))]
    rehearsal = {None: "no rehearsal", "text": "rehearsing the pretraining text", "base": "rehearsing the base's predictions (KL)"}
    tunes = "; ".join(f"{tune}: {rehearsal[r]}" for tune, (_, r) in setup["finetunes"].items())
    markdown = (
        f"# SkillPack benchmark: {args.setup} ({args.threads} threads)\n\n"
        f"{setup['family']} ({parameters:,} parameters, {setup['model']}), byte-level BPE of {setup['vocab']} tokens, pretrained "
        f"on pydoc text for {pretrain_steps} steps (until the validation perplexity flattened), then fine-tuned on "
        f"{setup['skill']} until {SKILL_LEARNED:.0%} exact match on held-back examples ({tunes}; answers alone in the loss). "
        f"Defaults were chosen on {CHOSEN_ON}{' (this setup)' if args.setup == CHOSEN_ON else '; this setup is reported untouched'}. "
        f"Every method stores the delta in at most bf16 bytes / ratio bytes of files (headers and metadata included). "
        f"SkillPack (examples), Delta-CoMe's GPTQ and BitDelta's distillation use the same {setup.get('examples', 512)} "
        f"training examples of the skill; SkillPack (generated) samples the tuned model; the data-free rows see the weights alone.\n\n"
        + markdown_table(models)
        + "\n\n## Methods at equal file bytes\n\nratio = bf16 bytes of the delta / file bytes; retention = "
        "(pack - base) / (tuned - base) on exact match over the test split; perplexity on held-out pydoc text.\n\n"
        + markdown_table(main_rows, columns)
        + f"\n\n## Ablation ({skills[0].name} fine-tune)\n\n"
        + markdown_table(ablation_rows, ["method", "target_ratio", "file_bytes", "retention", "perplexity", "relative_error", "extract_s"])
        + "\n\n## Targets\n\n"
        + markdown_table(found, ["target", "measured", "met"])
        + f"\n\nWall time: {time.perf_counter() - started:.0f} s.\n\n![retention vs compression](skillpack.png)\n"
    )
    data = {"setup": args.setup, "chosen_on": CHOSEN_ON, "threads": args.threads, "parameters": parameters, "pretrain_steps": pretrain_steps,
            "models": models, "rows": rows, "targets": found}
    write_results(out, "skillpack", data, markdown)
    plot(rows, os.path.join(out, "skillpack.png"))
    print(markdown)


if __name__ == "__main__":
    main()
