"""SkillPack fusion through a router against static merges, single packs and sequential fine-tuning.

1. A tiny Llama is pretrained on CPython's pydoc text (``base``). Three copies of it are each fully
   fine-tuned on one synthetic skill, with rehearsal of the pretraining text so general text stays
   near the base: modular addition (``"17 + 5 mod 4\\n"`` -> ``"The result is 2"``), string reversal
   (``"reverse: stone\\n"`` -> ``"enots"``) and formatted copying (``"copy: stone\\n"`` ->
   ``"<<stone>>"``). Each skill's delta is extracted into a SkillPack at ``--ratio``.
2. On every skill, in one run: the packs fused through a router (learned soft mixing and top-1,
   trained on ``--router-prompts`` training prompts per skill), task arithmetic, TIES, DARE-linear
   and DARE-TIES merges of the same packs (``merge_skillpacks``), each pack alone, and one model
   fine-tuned on the skills one after another (the last model scored on every skill). Reported:
   exact match, retention ``(method - base) / (tuned - base)`` and perplexity on held-out pydoc text.
3. Continual learning: a router model starts with pack 1; packs 2 and 3 are added with
   ``add_skillpack``. After each addition every skill so far is scored and the fused model is saved;
   the earlier packs' files must stay byte-identical to the packs as extracted. Alongside, the
   sequentially fine-tuned model's scores on the earlier skills after each stage (forgetting).

Trained models are cached under ``--out``/models (reruns with the same recipe skip training).
Writes ``fusion.json``, ``fusion.md`` and ``fusion.png`` to ``--out``.

    python scripts/bench_fusion.py --quick     # under 2 minutes on 2 CPU cores, smaller model, fewer prompts
    python scripts/bench_fusion.py             # about 20 minutes

Why one script of this length: the three parts share the trained models and are compared in one
table, so they run in one process; fusion, merging, extraction and caching are the library's
(``hf_graft.skillpack``, ``hf_graft.model_cache``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be downloaded

import argparse
import copy
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

import hf_graft
from hf_graft.causal_lm import (
    Schedule,
    build_causal_lm,
    encode_text,
    exact_match,
    finetune,
    perplexity,
    pretrain,
    skill_learned,
    task_batch,
    tiny_llama_config,
)
from hf_graft.data import copying, corpus_tokenizer, modular_addition, pydoc_corpus, reversal
from hf_graft.model_cache import cached_model
from hf_graft.reporting import markdown_table, save_figure, write_results
from hf_graft.skillpack import delta_spectrum, load_skillpack, merge_skillpacks, weight_deltas
from hf_graft.skillpack.files import CONFIG_NAME, WEIGHTS_NAME

SKILLS: dict[str, Callable] = {
    "modular addition": lambda train, test: modular_addition(4, train_size=train, test_size=test),
    "reversal": lambda train, test: reversal(train_size=train, test_size=test),
    "copying": lambda train, test: copying(train_size=train, test_size=test),
}
MERGES = {"task arithmetic": "task_arithmetic", "TIES": "ties", "DARE-linear": "dare_linear", "DARE-TIES": "dare_ties"}
ROUTERS = {"router (learned)": "learned", "router (top-1)": "top1"}
PACK_FILES = {CONFIG_NAME, WEIGHTS_NAME}  # what a saved fused model holds of each pack
SKILL_LEARNED = 0.95  # exact match on held-back training-side examples at which a fine-tune stops
DEFAULT_RATIO = 16.0  # each pack calibrated and distilled on its own skill's training examples
CALIBRATION_EXAMPLES = 1024
SETUPS = {
    # quick: a smaller model, shorter training and fewer evaluation prompts, to check the whole
    # pipeline in under 2 minutes; the figures to compare come from the full run.
    "quick": {
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "pretrain": Schedule(steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30, weight_decay=0.1),
        "finetune": Schedule(steps=400, batch_size=32, learning_rate=3e-3, warmup_steps=30, min_lr_ratio=1.0, seed=1),
        "replay_batch_size": 4,
        "train_size": 2000,
        "validation_size": 100,
        "test_size": 100,
        "held_out_tokens": 4096,
    },
    "full": {
        "model": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
        "pretrain": Schedule(steps=1000, batch_size=16, learning_rate=3e-3, warmup_steps=100, weight_decay=0.1),
        "finetune": Schedule(steps=1500, batch_size=32, learning_rate=2e-3, warmup_steps=50, min_lr_ratio=1.0, seed=1),
        "replay_batch_size": 8,
        "train_size": 2000,
        "validation_size": 200,
        "test_size": 400,
        "held_out_tokens": None,  # all of it
    },
}


@dataclasses.dataclass
class Bench:
    """What every step of the benchmark shares: data, models, reference scores and the output folder."""

    setup: dict
    out: str
    tokenizer: object
    train_ids: torch.Tensor
    held_out_ids: torch.Tensor
    tasks: dict
    base: torch.nn.Module = None
    base_scores: dict = dataclasses.field(default_factory=dict)

    def score(self, model, skills=None) -> dict:
        """``{skill: exact match}`` of ``model`` on the test prompts of ``skills`` (default: all)."""
        return {skill: exact_match(model, self.tokenizer, self.tasks[skill].test) for skill in skills or self.tasks}

    def perplexity(self, model) -> float:
        """Perplexity of ``model`` on the held-out pydoc text."""
        return perplexity(model, self.held_out_ids)["perplexity"]

    def fresh_base(self) -> torch.nn.Module:
        """A copy of the pretrained base, for anything that adapts a model in place."""
        return copy.deepcopy(self.base)


# Training, cached by recipe --------------------------------------------------------------------


def recipe_of(**parts) -> dict:
    """A JSON-able description of how a model is trained; a cached model is reused only for the same one."""
    return json.loads(json.dumps(parts, default=lambda value: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)))


def make_base(bench: Bench) -> dict:
    """Pretrain the target on the pydoc text (or load it from the cache); return its training info."""
    setup = bench.setup

    def train():
        model = build_causal_lm(tiny_llama_config(bench.tokenizer, **setup["model"]), seed=0)
        losses = pretrain(model, bench.train_ids, setup["pretrain"])
        return model, {"steps": len(losses), "final_loss": statistics.mean(losses[-20:])}

    bench.base, info, cached = cached_model(os.path.join(bench.out, "models", "base"), base_recipe(bench), train)
    return {**info, "cached": cached}


def base_recipe(bench: Bench) -> dict:
    """The base's recipe, part of every fine-tune's (a new base invalidates the fine-tunes)."""
    setup = bench.setup
    return recipe_of(model=setup["model"], pretrain=setup["pretrain"], vocab=len(bench.tokenizer))


def finetuned(bench: Bench, start: torch.nn.Module, skill: str, name: str, history: list) -> tuple:
    """A copy of ``start`` fine-tuned on ``skill`` with rehearsal, until it is learned (cached as ``name``).

    Fine-tuning stops once the exact match on held-back training-side examples reaches
    :data:`SKILL_LEARNED` (asked every 100 steps) or at the schedule's last step.
    """
    setup = bench.setup
    size = setup["validation_size"]
    train, validation = bench.tasks[skill].train[:-size], bench.tasks[skill].train[-size:]
    recipe = recipe_of(base=base_recipe(bench), history=history, skill=skill, finetune=setup["finetune"],
                       replay=setup["replay_batch_size"], train_size=setup["train_size"], validation=size, stop=SKILL_LEARNED)

    def train_model():
        model = copy.deepcopy(start)
        losses = finetune(
            model,
            bench.tokenizer,
            train,
            setup["finetune"],
            replay_ids=bench.train_ids,
            replay_batch_size=setup["replay_batch_size"],
            stop=skill_learned(model, bench.tokenizer, validation, threshold=SKILL_LEARNED),
        )
        return model, {"steps": len(losses)}

    model, info, cached = cached_model(os.path.join(bench.out, "models", name), recipe, train_model)
    return model, {**info, "cached": cached}


def file_digests(folder: str) -> dict:
    """``{file name: sha256}`` of the plain files in ``folder``."""
    digests = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file():
            with open(entry.path, "rb") as handle:
                digests[entry.name] = hashlib.sha256(handle.read()).hexdigest()
    return digests


# The comparison ----------------------------------------------------------------------------------


def method_rows(bench: Bench, tuned: dict, packs: dict, sequential, router_prompts: dict, progress) -> tuple:
    """Every method scored on every skill: rows ``{method, skill, exact_match, retention, perplexity}``.

    Also returns each router's accuracy at sending the test prompts to their own skill's pack.
    """
    rows, routing = [], {}

    def add(method: str, model, skills=None, scores=None):
        scores = scores or bench.score(model, skills)
        text = bench.perplexity(model)
        for skill, value in scores.items():
            rows.append({"method": method, "skill": skill, "exact_match": value, "perplexity": text})
        progress.update(1)

    add("base", bench.base, scores=bench.base_scores)
    for skill, model in tuned.items():
        add("fine-tuned (own skill)", model, [skill])
    for skill, folder in packs.items():
        add("pack alone", load_skillpack(bench.fresh_base(), folder).eval(), [skill])
    for method, mode in ROUTERS.items():
        fused = hf_graft.fuse(bench.fresh_base(), packs, router=mode, prompts=router_prompts, tokenizer=bench.tokenizer)
        routing[method] = routing_accuracy(bench, fused)
        add(method, fused)
    for method, name in MERGES.items():
        add(method, merge_skillpacks(bench.base, list(packs.values()), method=name, density=0.5, seed=0))
    add("sequential fine-tuning", sequential)

    tuned_scores = {row["skill"]: row["exact_match"] for row in rows if row["method"] == "fine-tuned (own skill)"}
    for row in rows:
        row["retention"] = retention(bench, row["skill"], row["exact_match"], tuned_scores)
    return rows, routing


def retention(bench: Bench, skill: str, value: float, tuned_scores: dict):
    """``(value - base) / (tuned - base)`` on ``skill``, or None where the fine-tune did not beat the base."""
    gain = tuned_scores[skill] - bench.base_scores[skill]
    return (value - bench.base_scores[skill]) / gain if gain > 0 else None


@torch.no_grad()
def routing_accuracy(bench: Bench, fused) -> dict:
    """Per skill, the fraction of its test prompts whose largest routing weight is its own pack."""
    accuracy = {}
    for index, skill in enumerate(fused.skills):
        encoded = bench.tokenizer([prompt for prompt, _ in bench.tasks[skill].test], return_tensors="pt", padding=True)
        weights = fused.routing_weights(encoded["input_ids"], encoded["attention_mask"])
        accuracy[skill] = float((weights.argmax(-1) == index).float().mean())
    return accuracy


def continual(bench: Bench, packs: dict, stages: list, router_prompts: dict, progress) -> list:
    """Packs added one at a time to a learned router, against sequential fine-tuning, stage by stage.

    Each stage has a row per skill learned so far: the router model's and the sequential model's
    exact match and, for a pack added at an earlier stage, whether its files in the fused model
    saved at this stage are byte-identical to the pack as extracted.
    """
    skills = list(packs)
    originals = {skill: file_digests(folder) for skill, folder in packs.items()}
    rows, fused = [], None
    for stage, skill in enumerate(skills, start=1):
        if fused is None:
            fused = hf_graft.fuse(bench.fresh_base(), {skill: packs[skill]}, router="learned",
                                  prompts={skill: router_prompts[skill]}, tokenizer=bench.tokenizer)
        else:
            fused.add_skillpack(packs[skill], name=skill, prompts=router_prompts[skill], tokenizer=bench.tokenizer)
        folder = os.path.join(bench.out, "continual", f"stage-{stage}")
        fused.save_pretrained(folder)
        router_scores = bench.score(fused, skills[:stage])
        sequential_scores = bench.score(stages[stage - 1], skills[:stage])
        for learned in skills[:stage]:
            saved = file_digests(os.path.join(folder, learned))
            rows.append({
                "stage": stage, "added": skill, "skill": learned,
                "router_exact_match": router_scores[learned], "sequential_exact_match": sequential_scores[learned],
                # an earlier pack's files in the saved fused model, against the pack as extracted
                "pack_files_byte_identical": (
                    set(saved) == PACK_FILES and all(saved[name] == originals[learned][name] for name in PACK_FILES)
                    if learned != skill else None
                ),
            })
        progress.update(1)
    return rows


# Targets, tables and the plot --------------------------------------------------------------------


def targets(rows: list, continual_rows: list, skills: list) -> list:
    """The targets, each with what this run measured."""
    table = {(row["method"], row["skill"]): row["retention"] for row in rows}
    found = []
    for method in ROUTERS:
        kept = {}
        for skill in skills:
            single, fused = table[("pack alone", skill)], table[(method, skill)]
            kept[skill] = fused / single if single is not None and single > 0 and fused is not None else None
        worst = min((v for v in kept.values() if v is not None), default=None)
        found.append({
            "target": f"{method}: keeps >= 95% of each single pack's retention, every skill",
            "measured": ", ".join(f"{s}: {v:.1%}" if v is not None else f"{s}: n/a (pack retains nothing)" for s, v in kept.items()),
            "met": worst is not None and all(v is not None and v >= 0.95 for v in kept.values()),
        })
        mean = statistics.mean(table[(method, s)] or 0.0 for s in skills)
        best_merge = max(MERGES, key=lambda m: statistics.mean(table[(m, s)] or 0.0 for s in skills))
        best = statistics.mean(table[(best_merge, s)] or 0.0 for s in skills)
        found.append({
            "target": f"{method}: mean retention >= best static merge + 10 points",
            "measured": f"{mean:.1%} vs {best:.1%} ({best_merge}): {100 * (mean - best):+.1f} points",
            "met": mean - best >= 0.10,
        })
    stage_of = {}
    for row in continual_rows:
        stage_of.setdefault(row["skill"], {})[row["stage"]] = row["router_exact_match"]
    last = max(row["stage"] for row in continual_rows)
    losses = {skill: scores[last] - scores[min(scores)] for skill, scores in stage_of.items() if min(scores) < last}
    found.append({
        "target": f"continual: zero loss on earlier skills after {last} packs",
        "measured": ", ".join(f"{s}: {v:+.4f}" for s, v in losses.items()),
        "met": all(v >= 0 for v in losses.values()),
    })
    checks = [row["pack_files_byte_identical"] for row in continual_rows if row["pack_files_byte_identical"] is not None]
    found.append({
        "target": "continual: earlier packs' files byte-identical after every addition",
        "measured": f"{sum(checks)} of {len(checks)} checks",
        "met": all(checks),
    })
    return found


def plot(rows: list, continual_rows: list, skills: list, path: str) -> str:
    """Retention per skill per method as grouped bars; continual exact match per stage beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["pack alone", *ROUTERS, *MERGES, "sequential fine-tuning"]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.6), dpi=120, gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / len(methods)
    table = {(row["method"], row["skill"]): row["retention"] for row in rows}
    for index, method in enumerate(methods):
        values = [table.get((method, skill)) or 0.0 for skill in skills]
        bars.bar([s + (index - (len(methods) - 1) / 2) * width for s in range(len(skills))], values, width, label=method)
    bars.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    bars.set_xticks(range(len(skills)), skills)
    bars.set_ylabel("retention (method - base) / (tuned - base)")
    bars.set_title("Skill retention per method")
    bars.grid(True, axis="y", alpha=0.3)
    bars.legend(fontsize=7, ncol=2)
    for color, skill in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], skills):
        points = [row for row in continual_rows if row["skill"] == skill]
        stages = [row["stage"] for row in points]
        lines.plot(stages, [row["router_exact_match"] for row in points], marker="o", color=color, label=f"{skill}: router")
        lines.plot(stages, [row["sequential_exact_match"] for row in points], marker="x", linestyle="--", color=color,
                   label=f"{skill}: sequential")
    lines.set_xticks(range(1, len(skills) + 1), [f"+{s}" for s in skills])
    lines.set_ylabel("exact match")
    lines.set_title("Continual learning: earlier skills after each addition")
    lines.grid(True, alpha=0.3)
    lines.legend(fontsize=7)
    return save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, shorter training, fewer prompts (under 2 minutes)")
    parser.add_argument("--out", default="bench_results/fusion")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="SkillPack target ratio (bf16 delta bytes / stored bytes)")
    parser.add_argument("--router-prompts", type=int, default=16, help="training prompts per skill for the router")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mode = "quick" if args.quick else "full"
    setup = SETUPS[mode]
    started = time.perf_counter()

    tokenizer = corpus_tokenizer()
    corpus = pydoc_corpus()
    held_out = encode_text(tokenizer, corpus.held_out)
    bench = Bench(
        setup=setup,
        out=args.out,
        tokenizer=tokenizer,
        train_ids=encode_text(tokenizer, corpus.train),
        held_out_ids=held_out[: setup["held_out_tokens"]] if setup["held_out_tokens"] else held_out,
        tasks={name: make(setup["train_size"], setup["test_size"]) for name, make in SKILLS.items()},
    )
    skills = list(SKILLS)
    training = {"base": make_base(bench)}
    bench.base_scores = bench.score(bench.base)
    tuned, spectra = {}, {}
    for skill in skills:
        tuned[skill], training[skill] = finetuned(bench, bench.base, skill, f"tuned-{skill.replace(' ', '-')}", [])
        spectra[skill] = delta_spectrum(weight_deltas(bench.base, tuned[skill]))
    # Sequential fine-tuning: stage 1 is the skill-1 model itself (same start, recipe and seed).
    stages, history = [tuned[skills[0]]], [skills[0]]
    for skill in skills[1:]:
        model, training[f"sequential +{skill}"] = finetuned(bench, stages[-1], skill, f"sequential-{len(stages) + 1}", list(history))
        stages.append(model)
        history.append(skill)

    packs, pack_info = {}, []
    for skill in skills:
        folder = os.path.join(args.out, "packs", skill.replace(" ", "-"))
        examples = bench.tasks[skill].train[:CALIBRATION_EXAMPLES]
        calibration = [task_batch(bench.tokenizer, examples[i : i + 32]) for i in range(0, len(examples), 32)]
        config = hf_graft.SkillPackConfig(target_ratio=args.ratio, calibration_samples=len(examples))
        pack = hf_graft.extract_skillpack(bench.base, tuned[skill], config, calibration=calibration, progress=False)
        pack.save_pretrained(folder)
        measured = pack.peft_config["default"].measured
        packs[skill] = folder
        pack_info.append({
            "skill": skill, "finetune_steps": training[skill]["steps"], "stored_bytes": measured["stored_bytes"],
            "ratio": measured["compression_ratio"], "relative_error": measured["relative_error"],
            "file_bytes": sum(e.stat().st_size for e in os.scandir(folder) if e.is_file()), **spectra[skill],
        })
    generator = torch.Generator().manual_seed(0)
    router_prompts = {
        skill: [bench.tasks[skill].train[i][0] for i in torch.randperm(len(bench.tasks[skill].train), generator=generator)[: args.router_prompts].tolist()]
        for skill in skills
    }

    with tqdm(total=len(skills) * 2 + len(ROUTERS) + len(MERGES) + 2 + len(skills), desc="Evaluating") as progress:
        rows, routing = method_rows(bench, tuned, packs, stages[-1], router_prompts, progress)
        continual_rows = continual(bench, packs, stages, router_prompts, progress)
    found = targets(rows, continual_rows, skills)
    wall = time.perf_counter() - started

    parameters = sum(p.numel() for p in bench.base.parameters())
    per_method = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = {row["skill"]: row for row in rows if row["method"] == method}
        entry = {"method": method}
        for skill in skills:
            entry[f"{skill} EM"] = mine[skill]["exact_match"] if skill in mine else None
            entry[f"{skill} retention"] = mine[skill]["retention"] if skill in mine else None
        kept = [row["retention"] for row in mine.values() if row["retention"] is not None]
        entry["mean retention"] = statistics.mean(kept) if len(mine) == len(skills) and kept else None
        entry["perplexity"] = (
            next(iter(mine.values()))["perplexity"] if len({row["perplexity"] for row in mine.values()}) == 1
            else " / ".join(f"{row['perplexity']:.2f}" for row in mine.values())
        )
        per_method.append(entry)
    routing_rows = [{"router": method, **accuracy} for method, accuracy in routing.items()]
    base_perplexity = next(row["perplexity"] for row in rows if row["method"] == "base")
    quick_note = (
        "**Quick run**: a smaller model, shorter training and fewer test prompts, to check the pipeline; "
        "compare the figures of the full run.\n\n" if args.quick else ""
    )
    markdown = (
        f"# SkillPack fusion benchmark ({mode}, {args.threads} threads)\n\n"
        + quick_note
        + f"Tiny Llama ({parameters:,} parameters, {setup['model']}) pretrained on pydoc text for "
        f"{training['base']['steps']} steps (held-out perplexity {base_perplexity:.2f}); a copy fine-tuned per skill "
        f"(every weight, rehearsal of the pretraining text, until {SKILL_LEARNED:.0%} exact match on held-back "
        f"examples, at most {setup['finetune'].steps} steps); SkillPacks at target ratio {args.ratio:g}x; routers "
        f"trained on {args.router_prompts} training prompts per skill; merges at density 0.5; "
        f"{setup['test_size']} test prompts per skill.\n\n"
        "## SkillPacks\n\nratio = bf16 bytes of the delta / stored bytes; energy = share of the delta's energy in "
        "its top 1% / 10% of singular values.\n\n"
        + markdown_table(pack_info)
        + "\n\n## Methods per skill\n\nEM = exact match on the test prompts; retention = (method - base) / "
        "(fine-tuned - base); perplexity on held-out pydoc text (a single model's, or per skill's own model).\n\n"
        + markdown_table(per_method)
        + "\n\n## Routing accuracy (test prompts sent to their own skill's pack)\n\n"
        + markdown_table(routing_rows)
        + "\n\n## Continual learning\n\nPacks added one at a time to a learned router (`add_skillpack`), against "
        "one model fine-tuned on the skills in the same order; exact match on each skill learned so far.\n\n"
        + markdown_table(continual_rows, ["stage", "added", "skill", "router_exact_match", "sequential_exact_match", "pack_files_byte_identical"])
        + "\n\n## Targets\n\n"
        + markdown_table(found, ["target", "measured", "met"])
        + f"\n\nWall time: {wall:.0f} s"
        + (" (models loaded from the cache)" if all(info.get("cached") for info in training.values()) else "")
        + ".\n\n![retention per method and continual learning](fusion.png)\n"
    )
    data = {
        "mode": mode, "threads": args.threads, "ratio": args.ratio, "router_prompts": args.router_prompts,
        "parameters": parameters, "training": training, "base_scores": bench.base_scores, "packs": pack_info,
        "rows": rows, "routing_accuracy": routing, "continual": continual_rows, "targets": found, "wall_s": wall,
    }
    write_results(args.out, "fusion", data, markdown)
    plot(rows, continual_rows, skills, os.path.join(args.out, "fusion.png"))
    print(markdown)


if __name__ == "__main__":
    main()
