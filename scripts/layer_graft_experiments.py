"""Layer grafting with translators: the structure of Zimmermann & Boussard's Tables 1-10, offline, in one run.

Everything is trained here, on CPython's pydoc text, so nothing is downloaded:

1. a *vanilla* GPT-NeoX (the pythia family: parallel residual, 25% rotary) and *hosts* of the
   same family, pretrained on the pydoc topics with the end-of-text token between documents (as
   pythia's training text has): the main host shares the vanilla's initialisation seed and reads
   the text in another order (pythia-70m and pythia-70m-deduped share their seed and differ in
   data), a second host differs in its initialisation seed too, and two wider hosts (1.5x, 2x)
   serve the size table. An uncased WordPiece BERT pretrained on the same text scores MLM
   predictability (``--mlm bert-base-uncased`` uses the paper's scorer where the Hub is reachable);
2. one block of the vanilla model is specialised on modular addition (n = 4, answers
   ``"The result is x"``) with LoRA on that block only (``specialise_block``);
3. the vanilla block is grafted into a host between a pre- and a post-translator, the
   translators are trained, and the specialised block is swapped in. One factor at a time moves
   away from the paper's procedure (identity translators trained on corpus text with the KL
   divergence between residual streams, grafted after the host block of the donor block's
   index): loss (Tables 1-2), destination (Tables 3-4), translator data (Tables 5-6), strategy
   (Tables 7-8), host size (Tables 9-10), and the host's initialisation (beyond the paper);
4. a best configuration, beyond the paper, is picked on held-back training examples (never the
   test split) and checked against targets: the last block specialised with rehearsal of the
   pretraining text, ridge least-squares translators, over destinations, ridges and hosts;
5. that best graft gated (``gate=True``), its gate trained on the task and on pretraining text or
   on the openness labels alone (``train_gate``), against the ungated graft and its own targets.

Each model gets the paper's metrics through hf-graft's evaluate modules: format-hard (f_H),
format-soft (f_S) and factual (fact) on greedy answers to the test prompts; lexical perplexity (P)
and MLM predictability (MLM) of greedy continuations of held-out text; and the model's own
perplexity on the held-out text (PPL). Trained models are cached under ``--out``/models, so a
rerun skips training. Writes ``layer_graft.md``, ``layer_graft.json`` and ``layer_graft.png``.

    python scripts/layer_graft_experiments.py --quick   # about 2 minutes on 2 CPU cores, tiny models
    python scripts/layer_graft_experiments.py           # about 35 minutes

Why one script of this length: it is the experiment's design, not library code. Its variants, the
ten tables they fill, the targets and the selection beyond the paper belong together so that one
run reproduces one set of tables; the training, grafting, metrics and caching it calls are the
library's (``hf_graft.layers``, ``hf_graft.causal_lm``, ``hf_graft.model_cache``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be downloaded

import argparse
import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, GPTNeoXForCausalLM

import hf_graft
from hf_graft import metrics
from hf_graft.causal_lm import (
    Schedule,
    build_causal_lm,
    encode_text,
    example_batches,
    finetune,
    perplexity,
    perplexity_plateau,
    pretrain,
    tiny_gpt_neox_config,
)
from hf_graft.data import Task, corpus_tokenizer, modular_addition, pydoc_corpus
from hf_graft.layers import (
    block_linear_names,
    fit_translators,
    gate_openness,
    specialise_block,
    train_gate,
    train_translators,
    translator_batches,
)
from hf_graft.layers.evaluation import language_scores, task_scores, text_prompts
from hf_graft.layers.masked_lm import corpus_masked_lm
from hf_graft.model_cache import cached_model
from hf_graft.reporting import markdown_table, save_figure, write_results

SETUPS = {
    # quick: tiny models and short schedules, to check the whole pipeline in about 2 minutes;
    # its figures say nothing about grafting, the full run's do.
    "quick": {
        "donor": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
        "host_widths": (64, 96, 128),
        "pretrain": Schedule(steps=120, batch_size=8, learning_rate=3e-3, warmup_steps=20, weight_decay=0.1),
        "paper_layer": 1,
        "specialise": Schedule(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10),
        "rank": 8,
        "translator_batches": 12,
        "translator_steps": 60,
        "positions": (0, 2, 3),
        "best_positions": (2, 3),
        "ridges": (0.3,),
        "selection_data": ("mixed",),
        "test_size": 96,
        "validation_size": 64,
        "text_prompts": 16,
        "mlm": Schedule(steps=60, batch_size=16, learning_rate=2e-3, warmup_steps=10, weight_decay=0.01),
    },
    "full": {
        "donor": {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4},
        "host_widths": (96, 144, 192),  # 1 : 1.5 : 2, as pythia-70m : 160m : 410m (512, 768, 1024)
        "pretrain": Schedule(steps=1200, batch_size=8, learning_rate=3e-3, warmup_steps=50, weight_decay=0.1),
        "paper_layer": 1,
        "specialise": Schedule(steps=300, batch_size=32, learning_rate=2e-3, warmup_steps=20),
        "rank": 8,
        "translator_batches": 32,
        "translator_steps": 300,
        "positions": None,  # every destination, 0 to the host's number of blocks
        "best_positions": (2, 3, 4),
        "ridges": (0.03, 0.1, 0.3),
        "selection_data": ("mixed", "corpus"),
        "test_size": 500,
        "validation_size": 200,
        "text_prompts": 64,
        "mlm": Schedule(steps=400, batch_size=32, learning_rate=1e-3, warmup_steps=40, weight_decay=0.01),
    },
}
MODULUS = 4  # n of the task "a + b mod n", as the paper's
PRETRAIN_SEQ_LEN = 128  # also the window of the held-out perplexity
VALIDATION_TOKENS = 10_000  # end of the training text, held back: when pretraining has flattened, model selection
REPLAY_BATCH_SIZE = 8  # pretraining windows rehearsed per step by the rehearsed specialisation
TRANSLATOR_BATCH = dict(batch_size=16, seq_len=64)
TRANSLATOR_LEARNING_RATE = 1e-3
PAPER_RIDGE = 1e-4  # fit_translators' default: the least-squares fit of the size table
NEW_TOKENS = 32  # greedy continuation of each held-out text prompt
PROMPT_TOKENS = 24
MLM_TOP_K = 5
TARGETS = {"format_soft": 0.95, "format_hard": 0.5, "factual_vs_tuned": 0.9, "perplexity_vs_host": 1.05}
GATED_TARGETS = {"perplexity_vs_host": 1.02, "language_vs_host": 0.05, "format": 0.95, "factual_vs_tuned": 0.9}
GATE_STEPS = 3000  # chosen on the shared-init host's held-back text: KL to the host 0.0054 / 0.0022 / 0.0009 after 300 / 1000 / 3000
GATE_ABLATION = {  # how the gate of the best graft is trained, or not
    "no gate": None,
    "gate, openness labels only": {"match_outputs": False},
    "gate + general text (the host's output)": {"match_outputs": True},
}
VANILLA_SEED = 0  # initialisation and data order of the vanilla model
OTHER_SEED = 1  # data order of every host; initialisation of the "other initialisation" host


@dataclass(frozen=True)
class Variant:
    """One grafted model: which host and specialised block, where it goes, how its translators are made.

    ``strategy="original"`` makes the translators around the vanilla block and then swaps the
    specialised block in; ``"direct"`` makes them around the specialised block. ``init`` starts
    them as identities or fits them by ridge least squares (``ridge``); ``stages`` are then
    trained with ``loss`` (none: the fit is kept as it is). ``tuned`` names the specialised
    block: ``"paper"`` (``specialise_block``) or ``"rehearsal"`` (the last block, rehearsing).
    """

    position: int
    host: str = "host"
    loss: str = "residual_kl"
    data: str = "corpus"
    strategy: str = "original"
    init: str = "identity"
    ridge: float = PAPER_RIDGE
    stages: tuple = ("pre", "post")
    tuned: str = "paper"

    def label(self) -> str:
        return (f"{self.host}-L{self.position}-{self.tuned}-{self.strategy}-{self.data}-{self.init}"
                + (f"{self.ridge:g}" if self.init == "least_squares" else "")
                + (f"-{self.loss}-{'+'.join(self.stages)}" if self.stages else "-untrained"))

    def describe(self) -> str:
        made = "identity" if self.init == "identity" else f"least squares (ridge {self.ridge:g})"
        trained = f"then {'+'.join(self.stages)} trained with the {self.loss} loss" if self.stages else "not trained further"
        return (f"{self.host}, L_{self.position}, {self.tuned} block, {self.strategy} strategy, data {self.data}, "
                f"translators {made}, {trained}")


class Bench:
    """Tokenizer, data, trained models and the evaluation context shared by every experiment."""

    def __init__(self, setup: dict, out: str, mlm: str, top_k, progress: bool):
        self.setup, self.out, self.top_k, self.progress = setup, out, top_k, progress
        self.timings, self.training = {}, {}
        self.tokenizer = corpus_tokenizer()
        self.corpus = pydoc_corpus()
        text_ids = document_ids(self.tokenizer, self.corpus.train)
        self.train_ids, self.validation_ids = text_ids[:-VALIDATION_TOKENS], text_ids[-VALIDATION_TOKENS:]
        self.held_out_ids = encode_text(self.tokenizer, self.corpus.held_out)
        validation = setup["validation_size"]
        full = modular_addition(MODULUS, train_size=2000 + validation, test_size=setup["test_size"])
        self.task = Task(name=full.name, train=full.train[:-validation], test=full.test)
        self.validation = full.train[-validation:]
        self.prompts = text_prompts(self.tokenizer, self.corpus.held_out, count=setup["text_prompts"], prompt_tokens=PROMPT_TOKENS)
        self.references = [self._continuation(prompt) for prompt in self.prompts]

        start = time.perf_counter()
        if mlm == "offline":
            self.mlm, self.mlm_tokenizer = corpus_masked_lm(
                self.corpus.train, os.path.join(out, "models", "masked-lm"), schedule=setup["mlm"], progress=progress
            )
            self.mlm_name = "uncased WordPiece BERT, 2 blocks x 128, pretrained here on the pydoc text"
        else:
            self.mlm, self.mlm_tokenizer = AutoModelForMaskedLM.from_pretrained(mlm).eval(), AutoTokenizer.from_pretrained(mlm)
            self.mlm_name = mlm
        self.timings["masked_lm_s"] = time.perf_counter() - start

        start = time.perf_counter()
        donor = setup["donor"]
        main_width = setup["host_widths"][0]
        self.vanilla = self._pretrained("vanilla", donor, VANILLA_SEED, VANILLA_SEED)
        self.hosts = {"host": self._pretrained("host", donor, VANILLA_SEED, OTHER_SEED)}
        self.hosts["host-other-init"] = self._pretrained("host-other-init", donor, OTHER_SEED, OTHER_SEED)
        for width in setup["host_widths"][1:]:
            self.hosts[f"host-{width}"] = self._pretrained(f"host-{width}", {**donor, "hidden_size": width}, VANILLA_SEED, OTHER_SEED)
        self.size_hosts = {main_width: "host", **{w: f"host-{w}" for w in setup["host_widths"][1:]}}
        self.timings["pretraining_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self.layers = {"paper": setup["paper_layer"], "rehearsal": donor["num_hidden_layers"] - 1}
        self.tuned = {"paper": self._specialised("tuned", rehearse=False), "rehearsal": self._specialised("tuned-rehearsal", rehearse=True)}
        self.timings["specialisation_s"] = time.perf_counter() - start

    def _continuation(self, prompt: str) -> str:
        """The held-out text that follows ``prompt`` (``NEW_TOKENS`` tokens), the human reference."""
        at = self.corpus.held_out.find(prompt)
        if at < 0:
            return ""
        rest = encode_text(self.tokenizer, self.corpus.held_out[at + len(prompt) : at + len(prompt) + 40 * NEW_TOKENS])
        return self.tokenizer.decode(rest[:NEW_TOKENS])

    def _cached(self, name: str, settings: dict, build):
        """The model cached as ``models/<name>`` when it was made with ``settings``, else ``build()`` saved there.

        ``build()`` returns the model and a dict about its training, kept in ``self.training[name]``.
        """
        folder = os.path.join(self.out, "models", name)
        model, self.training[name], _ = cached_model(folder, settings, build, model_class=GPTNeoXForCausalLM, tokenizer=self.tokenizer)
        return model.eval()

    def _pretrained(self, name: str, shape: dict, init_seed: int, data_seed: int):
        """A GPT-NeoX of ``shape`` initialised with ``init_seed``, pretrained on the text drawn with ``data_seed``.

        Pretraining stops once the perplexity on the held-back end of the training text improves by
        less than 1% between checks (every 100 steps), or at the schedule's last step.
        """
        schedule = replace(self.setup["pretrain"], seed=data_seed)
        settings = {"shape": shape, "init_seed": init_seed, "schedule": repr(schedule), "seq_len": PRETRAIN_SEQ_LEN,
                    "text": hashlib.blake2b(self.train_ids.numpy().tobytes(), digest_size=8).hexdigest()}

        def build():
            model = build_causal_lm(tiny_gpt_neox_config(self.tokenizer, **shape), seed=init_seed)
            stop = perplexity_plateau(model, self.validation_ids)
            steps = len(pretrain(model, self.train_ids, schedule, seq_len=PRETRAIN_SEQ_LEN, stop=stop, progress=self.progress))
            return model, {"steps": steps, "validation_perplexity": perplexity(model, self.validation_ids)["perplexity"]}

        return self._cached(name, settings, build)

    def _specialised(self, name: str, rehearse: bool):
        """The vanilla model with one block specialised on modular addition (LoRA on that block, merged).

        Without rehearsal this is the paper's ``specialise_block`` on ``paper_layer``; with it, the
        last block is specialised while each step also rehearses pretraining text.
        """
        layer = self.layers["rehearsal" if rehearse else "paper"]
        schedule, rank = self.setup["specialise"], self.setup["rank"]
        settings = {"vanilla_weights": fingerprint(self.vanilla), "layer": layer, "schedule": repr(schedule),
                    "rank": rank, "task": self.task.train[:5], "rehearse": rehearse}

        def build():
            if rehearse:
                model = specialise_with_rehearsal(self.vanilla, layer, self.task, self.tokenizer, self.train_ids,
                                                  rank=rank, schedule=schedule, progress=self.progress)
            else:
                model = specialise_block(self.vanilla, layer, self.task, tokenizer=self.tokenizer, rank=rank,
                                         schedule=schedule, progress=self.progress)
            return model, {"steps": schedule.steps, "layer": layer}

        return self._cached(name, settings, build)

    def evaluate(self, model) -> dict:
        """The paper's task and language metrics of ``model``, and its held-out perplexity."""
        scores = task_scores(model, self.tokenizer, self.task.test)
        scores.update(
            language_scores(
                model,
                self.tokenizer,
                self.prompts,
                held_out_ids=self.held_out_ids,
                max_new_tokens=NEW_TOKENS,
                mlm=self.mlm,
                mlm_tokenizer=self.mlm_tokenizer,
                top_k=self.top_k,
            )
        )
        return scores

    def selection_scores(self, model) -> dict:
        """Task metrics on the held-back training examples and perplexity on the held-back training text: for model selection."""
        scores = task_scores(model, self.tokenizer, self.validation)
        scores["perplexity"] = perplexity(model, self.validation_ids, seq_len=PRETRAIN_SEQ_LEN)["perplexity"]
        return scores

    def graft(self, variant: Variant):
        """Build ``variant``: graft, fit and/or train its translators, swap the specialised block in (original)."""
        host = self.hosts[variant.host]
        tuned = self.tuned[variant.tuned]
        source = tuned if variant.strategy == "direct" else self.vanilla
        grafted = hf_graft.GraftedModelForCausalLM.from_models(
            host, source, donor_layer=self.layers[variant.tuned], position=variant.position,
            translator_init=variant.init, donor_name="vanilla" if variant.strategy == "original" else "tuned",
        )
        data = translator_batches(
            self.tokenizer, variant.data, task=self.task, corpus=self.corpus.train,
            batches=self.setup["translator_batches"], **TRANSLATOR_BATCH,
        )
        if variant.init == "least_squares":
            fit_translators(grafted, donor=source, host=host, data=data, ridge=variant.ridge)
        losses = {}
        if variant.stages:
            losses = train_translators(
                grafted, donor=source, host=host, data=data, loss=variant.loss, stages=variant.stages,
                steps=self.setup["translator_steps"], learning_rate=TRANSLATOR_LEARNING_RATE, progress=False,
            )
        if variant.strategy == "original":
            grafted.swap_block(tuned)
        return grafted.eval(), losses


def document_ids(tokenizer, text: str) -> torch.Tensor:
    """``text`` (a part of the pydoc corpus) as token ids with the end-of-text token after every pydoc topic.

    Pythia's training text separates documents with end-of-text; a model that never saw the token
    cannot learn to stop, and format-hard asks the answer to end there.
    """
    from pydoc_data.topics import topics

    kept = set(text.split("\n\n"))
    ids = []
    for name in sorted(topics):
        paragraphs = [p for p in topics[name].strip().split("\n\n") if p in kept]
        if paragraphs:
            ids += tokenizer("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def specialise_with_rehearsal(model, layer: int, task: Task, tokenizer, replay_ids, *, rank: int, schedule: Schedule, progress: bool):
    """``specialise_block`` (LoRA on block ``layer`` only, merged) with rehearsal of pretraining text.

    Each step adds the language-model loss of ``REPLAY_BATCH_SIZE`` windows of ``replay_ids``
    (``finetune``'s ``replay_ids``), so the block learns the task without losing the text: the
    specialised model's held-out perplexity stays near the vanilla's.
    """
    adapted = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=block_linear_names(model, layer)),
    )
    finetune(adapted, tokenizer, task.train, schedule, replay_ids=replay_ids, replay_batch_size=REPLAY_BATCH_SIZE,
             seq_len=PRETRAIN_SEQ_LEN, progress=progress)
    return adapted.merge_and_unload().eval()


def fingerprint(model) -> str:
    """A short hash of a model's weights, so a cached derivative is rebuilt when its parent changes."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()


def target_checks(scores: dict, tuned: dict, host_perplexity: float) -> list:
    """The targets beyond the paper, each with its measured figure and whether it is met."""
    factual_ratio = scores["factual"] / tuned["factual"] if tuned["factual"] else math.nan
    ppl_ratio = scores["perplexity"] / host_perplexity
    return [
        {"target": f"format-soft >= {TARGETS['format_soft']}", "measured": scores["format_soft"],
         "met": scores["format_soft"] >= TARGETS["format_soft"]},
        {"target": f"format-hard > {TARGETS['format_hard']}", "measured": scores["format_hard"],
         "met": scores["format_hard"] > TARGETS["format_hard"]},
        {"target": f"factual >= {TARGETS['factual_vs_tuned']:.0%} of the tuned model's", "measured": factual_ratio,
         "met": factual_ratio >= TARGETS["factual_vs_tuned"]},
        {"target": f"held-out perplexity <= {TARGETS['perplexity_vs_host']:.2f}x the host's", "measured": ppl_ratio,
         "met": ppl_ratio <= TARGETS["perplexity_vs_host"]},
    ]


def gated_checks(scores: dict, tuned: dict, host: dict) -> list:
    """The gated graft's targets: the host as it was off the task, the task as the tuned block does it."""
    factual_ratio = scores["factual"] / tuned["factual"] if tuned["factual"] else math.nan
    within = GATED_TARGETS["language_vs_host"]
    checks = [
        (f"held-out perplexity <= {GATED_TARGETS['perplexity_vs_host']:.2f}x the host's",
         scores["perplexity"] / host["perplexity"], lambda r: r <= GATED_TARGETS["perplexity_vs_host"]),
        (f"lexical perplexity within {within:.0%} of the host's", scores["lexical_perplexity"] / host["lexical_perplexity"],
         lambda r: abs(r - 1) <= within),
        (f"MLM predictability within {within:.0%} of the host's", scores["mlm_predictability"] / host["mlm_predictability"],
         lambda r: abs(r - 1) <= within),
        (f"format-hard >= {GATED_TARGETS['format']}", scores["format_hard"], lambda v: v >= GATED_TARGETS["format"]),
        (f"format-soft >= {GATED_TARGETS['format']}", scores["format_soft"], lambda v: v >= GATED_TARGETS["format"]),
        (f"factual >= {GATED_TARGETS['factual_vs_tuned']:.0%} of the tuned model's", factual_ratio,
         lambda r: r >= GATED_TARGETS["factual_vs_tuned"]),
    ]
    return [{"target": target, "measured": measured, "met": bool(test(measured))} for target, measured, test in checks]


def with_gate(grafted):
    """A copy of ``grafted`` (one graft) whose graft is gated: translators and block as they are, the gate new (open)."""
    config = copy.deepcopy(grafted.config)
    config.grafts[0]["gate"] = True
    gated = hf_graft.GraftedModelForCausalLM(config)
    missing, unexpected = gated.load_state_dict(grafted.state_dict(), strict=False)
    if unexpected or not all(".gate." in key for key in missing):
        raise RuntimeError(f"with_gate: unexpected weights {unexpected}, missing {missing}")
    return gated.eval()


def openness_rows_keys() -> list:
    """The rows :func:`openness_rows` fills, in order."""
    return [f"gate {what} ({where})" for where in ("task", "general") for what in ("mean", "open share")]


def openness_rows(grafted, data: dict) -> dict:
    """The gate's openness on the task's test prompts (with answers) and on the held-out text, as table rows."""
    rows = {}
    for where, batches in data.items():
        openness = gate_openness(grafted, batches)
        rows[f"gate mean ({where})"], rows[f"gate open share ({where})"] = openness["mean"], openness["open_share"]
    return rows


def selection_key(scores: dict, tuned: dict, host_perplexity: float) -> tuple:
    """Rank candidates: most targets met on held-back data, then f_H + f_S + factual share, less excess perplexity."""
    checks = target_checks(scores, tuned, host_perplexity)
    share = min(1.0, checks[2]["measured"]) if not math.isnan(checks[2]["measured"]) else 0.0
    excess = max(0.0, checks[3]["measured"] - TARGETS["perplexity_vs_host"])
    return sum(check["met"] for check in checks), scores["format_hard"] + scores["format_soft"] + share - excess


def paper_tables(columns: dict, title: str | None, number: int) -> str:
    """The paper's pair of tables for one experiment: task metrics, then language metrics, one column per model.

    ``title`` heads the pair (none: no heading); ``number`` is the paper's number of the first table (0: unnumbered).
    """
    task_rows = [("f_H", "format_hard"), ("f_S", "format_soft"), ("fact", "factual")]
    language_rows = [("P", "lexical_perplexity"), ("MLM", "mlm_predictability"), ("PPL", "perplexity")]
    names = list(columns)
    parts = [f"### {title}\n"] if title else []
    captions = (("Modular addition evaluation", task_rows), ("Language generation evaluation", language_rows))
    for offset, (caption, rows) in enumerate(captions):
        body = [{"metric": label, **{name: columns[name][key] for name in names}} for label, key in rows]
        heading = f"Table {number + offset}: {caption}" if number else caption
        parts.append(f"{heading}\n\n" + markdown_table(body, ["metric"] + names) + "\n")
    return "\n".join(parts)


def plot(panels: dict, ratios: dict, path: str) -> str:
    """One panel per experiment (f_H, f_S, fact of every column), and the grafts' perplexity over their host's."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), dpi=100)
    shown = (("format_hard", "f_H"), ("format_soft", "f_S"), ("factual", "fact"))
    for ax, (title, columns) in zip(axes.flat, panels.items()):
        names = list(columns)
        width = 0.8 / len(shown)
        for k, (key, label) in enumerate(shown):
            ax.bar([i + (k - 1) * width for i in range(len(names))], [columns[n][key] for n in names], width, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.axhline(TARGETS["format_soft"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[len(panels)]
    ax.barh(range(len(ratios)), list(ratios.values()), color="tab:purple")
    ax.set_yticks(range(len(ratios)))
    ax.set_yticklabels(list(ratios), fontsize=6)
    ax.axvline(TARGETS["perplexity_vs_host"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("grafted PPL / host PPL (dotted: 1.05)", fontsize=9)
    for ax in list(axes.flat)[len(panels) + 1 :]:
        ax.axis("off")
    fig.suptitle("Layer grafting: task metrics per experiment (dotted: format-soft target 0.95)")
    return save_figure(fig, path)


REFINEMENTS = {
    "least squares only": {"stages": ()},
    "+ residual training": {"stages": ("pre", "post"), "loss": "residual"},
    "+ logits training (post)": {"stages": ("post",), "loss": "logits"},
}


class Selection:
    """Candidates scored on held-back data (task examples, training text); the best one per host.

    A candidate's key is :func:`selection_key` against the rehearsed tuned model and its host on
    the same held-back data. Every candidate scored is kept as a row of the selection table.
    """

    def __init__(self, bench: Bench, hosts):
        self.bench, self.rows, self.kept = bench, [], {}
        self.tuned = bench.selection_scores(bench.tuned["rehearsal"])
        self.host_perplexity = {name: bench.selection_scores(bench.hosts[name])["perplexity"] for name in hosts}

    def score(self, variant: Variant, stage: str):
        """Graft ``variant`` and score it; returns its key and the grafted model."""
        grafted, _ = self.bench.graft(variant)
        scores = self.bench.selection_scores(grafted)
        key = selection_key(scores, self.tuned, self.host_perplexity[variant.host])
        self.rows.append({"stage": stage, "candidate": variant.label(), **scores,
                          "perplexity / host": scores["perplexity"] / self.host_perplexity[variant.host],
                          "targets met": key[0], "score": key[1]})
        return key, grafted

    def best(self, candidates: list, stage: str, progress: bool, keep: bool = False) -> dict:
        """``{host: (key, variant, grafted model)}``: the best of ``candidates`` for each host.

        With ``keep``, every grafted model stays in ``self.kept`` (by variant) for evaluation.
        """
        best = {}
        for variant in tqdm(candidates, desc=f"Selecting the best configuration ({stage})", disable=not progress):
            key, grafted = self.score(variant, stage)
            if keep:
                self.kept[variant] = grafted
            if variant.host not in best or key > best[variant.host][0]:
                best[variant.host] = (key, variant, grafted)
        return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, short training, fewer samples (about 2 minutes)")
    parser.add_argument("--out", default="bench_results/layer_graft")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the fastest on a shared 2-core machine)")
    parser.add_argument("--mlm", default="offline",
                        help='masked LM for MLM predictability: "offline" (a BERT trained here) or a Hub id/path, e.g. bert-base-uncased')
    parser.add_argument("--mlm-top-k", type=int, default=MLM_TOP_K,
                        help="count only words the masked LM retrieves in its top k, as the paper does (0: every word)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    setup = SETUPS[mode]
    top_k = args.mlm_top_k or None
    progress = not args.no_progress
    bench = Bench(setup, args.out, args.mlm, top_k, progress)
    layers = setup["donor"]["num_hidden_layers"]
    positions = setup["positions"] or tuple(range(layers + 1))
    paper = Variant(position=bench.layers["paper"] + 1)

    start = time.perf_counter()
    references = {
        "Tuned": bench.evaluate(bench.tuned["paper"]),
        "Tuned (rehearsal)": bench.evaluate(bench.tuned["rehearsal"]),
        "Vanilla": bench.evaluate(bench.vanilla),
        **{name.replace("host", "Host"): bench.evaluate(model) for name, model in bench.hosts.items()},
    }
    on_references = dict(data=[text or "." for text in bench.references])
    reference_text = {
        "lexical_perplexity": metrics.load("lexical_perplexity", keep_in_memory=True).compute(**on_references)["lexical_perplexity"],
        "mlm_predictability": metrics.load("mlm_predictability", keep_in_memory=True).compute(
            **on_references, model=bench.mlm, tokenizer=bench.mlm_tokenizer, top_k=top_k
        )["mlm_predictability"],
    }
    bench.timings["reference_evaluation_s"] = time.perf_counter() - start

    wanted = {
        "1-2. Loss technique": {
            "residual (KL)": paper,
            "residual (MSE)": replace(paper, loss="residual"),
            "logits": replace(paper, loss="logits"),
        },
        "3-4. Destination layer": {f"L_{p}": replace(paper, position=p) for p in positions},
        "5-6. Translator data": {"Mod": replace(paper, data="task"), "Mixed": replace(paper, data="mixed"), "Corpus": paper},
        "7-8. Grafting strategy": {"original": paper, "direct": replace(paper, strategy="direct")},
        "9-10. Host size": {
            f"host {w}": replace(paper, host=name, init="least_squares") for w, name in bench.size_hosts.items()
        },
        "Host initialisation": {"shared init": paper, "other init": replace(paper, host="host-other-init")},
    }
    unique = list(dict.fromkeys(v for variants in wanted.values() for v in variants.values()))
    results, translator_losses = {}, {}
    start = time.perf_counter()
    for variant in tqdm(unique, desc="Grafting and evaluating", disable=not progress):
        grafted, losses = bench.graft(variant)
        results[variant] = bench.evaluate(grafted)
        translator_losses[variant.label()] = losses
    bench.timings["experiments_s"] = time.perf_counter() - start

    # Beyond the paper: the best configuration per host pairing, chosen on held-back data, then refinements of it.
    start = time.perf_counter()
    candidates = [
        Variant(position=p, host=host, data=data, init="least_squares", ridge=ridge, stages=(), tuned="rehearsal")
        for host in ("host", "host-other-init")
        for data in setup["selection_data"]
        for ridge in setup["ridges"]
        for p in (setup["best_positions"] or positions)
    ]
    selector = Selection(bench, ("host", "host-other-init"))
    fitted = selector.best(candidates, "destination and ridge", progress)
    refinements = {host: {name: replace(variant, **change) for name, change in REFINEMENTS.items()}
                   for host, (_, variant, _) in fitted.items()}
    final = selector.best([v for options in refinements.values() for v in options.values()], "refinement", progress, keep=True)
    best = {host: variant for host, (_, variant, _) in final.items()}
    bench.timings["best_configuration_s"] = time.perf_counter() - start

    # Beyond the paper: the best graft of each host gated, its gate trained (or not) as GATE_ABLATION says.
    start = time.perf_counter()
    gate_data = {
        "task_data": translator_batches(bench.tokenizer, "task", task=bench.task, batches=setup["translator_batches"], **TRANSLATOR_BATCH),
        "general_data": translator_batches(bench.tokenizer, "corpus", corpus=bench.corpus.train,
                                           batches=setup["translator_batches"], **TRANSLATOR_BATCH),
    }
    windows = bench.held_out_ids[: bench.held_out_ids.numel() // PRETRAIN_SEQ_LEN * PRETRAIN_SEQ_LEN].reshape(-1, PRETRAIN_SEQ_LEN)
    openness_data = {"task": example_batches(bench.tokenizer, bench.task.test, batch_size=64),
                     "general": list(windows.split(TRANSLATOR_BATCH["batch_size"]))}
    gated, gate_losses = {}, {}
    for host, variant in best.items():
        gated[host], gate_losses[host] = {}, {}
        for name, how in GATE_ABLATION.items():
            if how is not None:
                model = with_gate(selector.kept[variant])
                gate_losses[host][name] = train_gate(model, **gate_data, steps=GATE_STEPS, progress=False, **how)
                gated[host][name] = {**bench.evaluate(model), **openness_rows(model, openness_data)}
    bench.timings["gated_graft_s"] = time.perf_counter() - start

    start = time.perf_counter()
    refined, before_swap = {}, {}
    for host, options in refinements.items():
        refined[host] = {name: bench.evaluate(selector.kept[variant]) for name, variant in options.items()}
        grafted = final[host][2]
        grafted.swap_block(bench.vanilla)  # the vanilla block back in place: what the translators alone cost
        before_swap[host] = perplexity(grafted, bench.held_out_ids, seq_len=PRETRAIN_SEQ_LEN)["perplexity"]
    chosen = {host: next(refined[host][name] for name, v in refinements[host].items() if v == best[host]) for host in best}
    selection = selector.rows
    bench.timings["best_configuration_s"] += time.perf_counter() - start
    tuned_reference = references["Tuned (rehearsal)"]
    for host in gated:
        gated[host] = {"no gate": chosen[host], **gated[host]}
    gated_name = list(GATE_ABLATION)[-1]
    host_reference = {host: references[host.replace("host", "Host")] for host in gated}
    gated_target_checks = {host: {name: gated_checks(scores, tuned_reference, host_reference[host]) for name, scores in options.items()}
                           for host, options in gated.items()}
    checks = {host: target_checks(chosen[host], tuned_reference, references[host.replace("host", "Host")]["perplexity"])
              for host in chosen}
    paper_checks = target_checks(results[paper], references["Tuned"], references["Host"]["perplexity"])

    def columns(variants: dict) -> dict:
        return {"Tuned": references["Tuned"], **{k: results[v] for k, v in variants.items()},
                "Vanilla": references["Vanilla"], "Host": references["Host"]}

    experiments = {title: columns(variants) for title, variants in wanted.items()}
    experiments["9-10. Host size"] = {
        "Tuned": references["Tuned"],
        **{name: results[v] for name, v in wanted["9-10. Host size"].items()},
        "Vanilla": references["Vanilla"],
        **{f"Host {w}": references[name.replace("host", "Host")] for w, name in bench.size_hosts.items()},
    }
    experiments["Host initialisation"]["Host (other init)"] = references["Host-other-init"]
    best_columns = {
        "Tuned (rehearsal)": tuned_reference,
        f"best, shared init: L_{best['host'].position}": chosen["host"],
        f"best, other init: L_{best['host-other-init'].position}": chosen["host-other-init"],
        "best + gate, shared init": gated["host"][gated_name],
        "best + gate, other init": gated["host-other-init"][gated_name],
        "paper procedure": results[paper],
        "Vanilla": references["Vanilla"],
        "Host": references["Host"],
        "Host (other init)": references["Host-other-init"],
    }
    wall = time.perf_counter() - started

    shape = setup["donor"]
    pretrained = ", ".join(
        f"{name} {info['steps']} steps (held-back perplexity {info['validation_perplexity']:.2f})"
        for name, info in bench.training.items() if "validation_perplexity" in info
    )
    met = {host: sum(c["met"] for c in checks[host]) for host in checks}
    target_rows = [
        {"target": c["target"], "best, shared init": c["measured"], "met": "yes" if c["met"] else "no",
         "best, other init": o["measured"], "met (other init)": "yes" if o["met"] else "no",
         "paper procedure": p["measured"], "met (paper)": "yes" if p["met"] else "no"}
        for c, o, p in zip(checks["host"], checks["host-other-init"], paper_checks)
    ]
    unmet = [c for c in checks["host"] if not c["met"]]
    lines = [
        f"# Layer grafting with translators: the paper's Tables 1-10 on tiny models ({mode} run)\n",
        ("**Quick run**: tiny models and short schedules that check the pipeline; its figures are not "
         "evidence about grafting. Run without `--quick` for those.\n" if args.quick else ""),
        f"- Models: GPT-NeoX (pythia layout: parallel residual, 25% rotary), {shape['num_hidden_layers']} blocks, "
        f"{shape['num_attention_heads']} heads, byte-level BPE of {len(bench.tokenizer)} tokens, each pretrained on "
        f"windows of {setup['pretrain'].batch_size} x {PRETRAIN_SEQ_LEN} tokens of the pydoc topics "
        f"({bench.train_ids.numel():,} tokens, end-of-text after each topic) until the perplexity on the last "
        f"{VALIDATION_TOKENS:,} tokens, held back, improved by less than 1% in 100 steps (at most "
        f"{setup['pretrain'].steps} steps): {pretrained}. Vanilla: {shape['hidden_size']} wide, "
        f"initialisation and data-order seed {VANILLA_SEED}. Host: the same shape and initialisation seed, data order "
        f"{OTHER_SEED} (as pythia-70m and pythia-70m-deduped share their seed). Host (other init): initialisation seed "
        f"{OTHER_SEED} too. Size table: hosts {', '.join(map(str, setup['host_widths']))} wide; the donor stays the vanilla.",
        f"- Specialised (\"Tuned\"): block {bench.layers['paper']} of the vanilla model with `specialise_block`, LoRA "
        f"r={setup['rank']} on that block only, {setup['specialise'].steps} steps of {setup['specialise'].batch_size} "
        f"at lr {setup['specialise'].learning_rate}, modular addition n={MODULUS} ({len(bench.task.train)} training examples, "
        f"{len(bench.task.test)} test prompts scored). \"Tuned (rehearsal)\": the last block, block "
        f"{bench.layers['rehearsal']}, the same LoRA and schedule, each step also rehearsing {REPLAY_BATCH_SIZE} windows of "
        "pretraining text.",
        f"- Graft: L_k = the block runs after the host's first k blocks (k = 0 .. {layers}). The paper's procedure, the "
        f"baseline every experiment departs from: {paper.describe()}. Translators: {setup['translator_batches']} batches "
        f"of {TRANSLATOR_BATCH['batch_size']} (task examples, or corpus windows of {TRANSLATOR_BATCH['seq_len']} tokens; "
        f"mixed: half each), {setup['translator_steps']} Adam steps per stage at lr {TRANSLATOR_LEARNING_RATE}. Host size: "
        f"translators initialised by least squares (ridge {PAPER_RIDGE:g}; the widths differ), then trained as the baseline.",
        f"- Language metrics on greedy continuations ({NEW_TOKENS} tokens) of {len(bench.prompts)} held-out prompts of "
        f"{PROMPT_TOKENS} tokens: P = lexical perplexity 2^H of word frequencies; MLM = mean probability the masked LM "
        f"({bench.mlm_name}) gives each masked word, "
        + (f"counting only the words it retrieves in its top {top_k} (the paper's delta_i)" if top_k else "every word counted")
        + f"; PPL = the model's perplexity on the held-out text ({bench.held_out_ids.numel():,} tokens, windows of "
        f"{PRETRAIN_SEQ_LEN}). The held-out text's own continuations score P = {reference_text['lexical_perplexity']:.3f}, "
        f"MLM = {reference_text['mlm_predictability']:.3f}.",
        f"- Wall time: {wall:.0f} s on {args.threads} torch thread(s) "
        f"({', '.join(f'{k[:-2].replace(chr(95), chr(32))} {v:.0f} s' for k, v in bench.timings.items())}).\n",
        "## Best configuration and targets (beyond the paper)\n",
        f"Candidates: the rehearsed last block grafted with ridge least-squares translators fitted on "
        f"{' or '.join(setup['selection_data'])} data (ridge {' / '.join(f'{r:g}' for r in setup['ridges'])}), at L_{', L_'.join(map(str, setup['best_positions'] or positions))}, "
        f"into either host ({len(candidates)} in all); then the best of each host as fitted, or with its translators "
        "trained further (residual loss, both stages; logits loss, post stage). Both choices per host on "
        f"{len(bench.validation)} training examples and {VALIDATION_TOKENS:,} tokens of training text held back from "
        "training (the test split is only scored). Chosen: "
        f"**{best['host'].describe()}**; on the other-init host: **{best['host-other-init'].describe()}**.\n",
        paper_tables(best_columns, None, 0),
        markdown_table(target_rows, ["target", "best, shared init", "met", "best, other init", "met (other init)",
                                     "paper procedure", "met (paper)"]) + "\n",
        f"Targets met: {met['host']} of 4 by the best graft into the shared-init host, {met['host-other-init']} of 4 into "
        f"the other-init host, {sum(c['met'] for c in paper_checks)} of 4 by the paper's procedure. Factual is compared "
        "with the tuned model the graft carries; perplexity with the graft's own host."
        + (f" The tuned model's own factual score, {tuned_reference['factual']:.3f}, is at or near chance (1/{MODULUS} "
           f"= {1 / MODULUS:.2f}): its block learned the answer's format but not the sums, so the factual target only "
           "says the graft answers as well as the block it carries, not that it computes."
           if tuned_reference["factual"] < 1.5 / MODULUS else "")
        + "\n",
    ]
    if unmet:
        lines.append(
            "Not met by the best graft: " + "; ".join(f"{c['target']} (measured {c['measured']:.3f})" for c in unmet)
            + ". What was tried is in the tables of this run: every destination, translator data, loss and strategy "
            "(the paper's tables below), the host's initialisation, ridges and destinations for least-squares "
            "translators (the selection table), and training the fitted translators further with the residual or "
            "the logits loss (the tables just below). The paper's specialised block (no rehearsal) raises the "
            f"vanilla's own held-out perplexity {references['Tuned']['perplexity'] / references['Vanilla']['perplexity']:.2f}x, "
            "the rehearsed one "
            f"{references['Tuned (rehearsal)']['perplexity'] / references['Vanilla']['perplexity']:.2f}x. With the vanilla "
            "block in place of the specialised one, the best graft's translators alone already cost "
            f"{before_swap['host'] / references['Host']['perplexity']:.3f}x the host's perplexity (other-init host: "
            f"{before_swap['host-other-init'] / references['Host-other-init']['perplexity']:.3f}x): they are linear maps "
            "between two models' residual streams and cannot undo the grafted block's non-linear contribution exactly; "
            "the swap adds the rest.\n"
        )
    gated_rows = [
        {"target": c["target"], "shared init": c["measured"], "met": "yes" if c["met"] else "no",
         "other init": o["measured"], "met (other init)": "yes" if o["met"] else "no"}
        for c, o in zip(gated_target_checks["host"][gated_name], gated_target_checks["host-other-init"][gated_name])
    ]
    lines += [
        "## Gated graft (beyond the paper)\n",
        f"The best graft of each host with a gate on its output, `h + g(h) * (graft(h) - h)`, g read from the host's "
        f"stream before the graft (`from_models(..., gate=True)`), trained alone for {GATE_STEPS} steps "
        f"(`layers.train_gate`) on the task's training examples and on pretraining text "
        f"({setup['translator_batches']} batches of each): \"openness labels only\" pulls the gate to 1 on the task "
        "and to 0 on the text; \"+ general text\" adds the KL divergences to the graft wide open on the task and "
        "to the host's own output on the text. Openness is measured on the task's test prompts with their answers "
        f"and on the held-out text ({windows.numel():,} tokens); open share = share of tokens above 0.5.\n",
        markdown_table(gated_rows, ["target", "shared init", "met", "other init", "met (other init)"]) + "\n",
    ]
    for host, title in (("host", "shared-init host"), ("host-other-init", "other-init host")):
        host_name = host.replace("host", "Host")
        table = {"Tuned (rehearsal)": tuned_reference, **gated[host], host_name: host_reference[host]}
        shown = [("f_H", "format_hard"), ("f_S", "format_soft"), ("fact", "factual"), ("P", "lexical_perplexity"),
                 ("MLM", "mlm_predictability"), ("PPL", "perplexity")] + [(key, key) for key in openness_rows_keys()]
        body = [{"metric": label, **{name: scores.get(key, math.nan) for name, scores in table.items()}} for label, key in shown]
        body.append({"metric": "PPL / host", **{name: scores["perplexity"] / host_reference[host]["perplexity"]
                                                for name, scores in table.items()}})
        met = {name: sum(c["met"] for c in checks_) for name, checks_ in gated_target_checks[host].items()}
        lines += [f"### Gate ablation ({title}; targets met of 6: "
                  + ", ".join(f"{name} {count}" for name, count in met.items()) + ")\n",
                  markdown_table(body, ["metric", *table]) + "\n"]
    for host, title in (("host", "shared-init host"), ("host-other-init", "other-init host")):
        chosen_name = next(name for name, v in refinements[host].items() if v == best[host])
        lines += [
            f"### Training the fitted translators further ({title}; chosen on held-back data: {chosen_name})\n",
            paper_tables({"Tuned (rehearsal)": tuned_reference, **refined[host],
                          host.replace("host", "Host"): references[host.replace("host", "Host")]}, None, 0),
        ]
    lines.append("## The paper's tables\n")
    numbers = {"1-2. Loss technique": 1, "3-4. Destination layer": 3, "5-6. Translator data": 5,
               "7-8. Grafting strategy": 7, "9-10. Host size": 9, "Host initialisation": 0}
    for title, number in numbers.items():
        heading = f"Tables {title}" if number else f"{title} (beyond the paper: the host of the paper's pair vs one of another seed)"
        lines.append(paper_tables(experiments[title], heading, number))
    lines += [
        "## Selection of the best configuration (held-back examples and training text)\n",
        markdown_table(selection, ["stage", "candidate", "format_hard", "format_soft", "factual", "perplexity",
                                   "perplexity / host", "targets met", "score"]) + "\n",
        "![task metrics per experiment](layer_graft.png)\n",
    ]
    markdown = "\n".join(line for line in lines if line)

    data = {
        "mode": mode,
        "setup": {k: (repr(v) if isinstance(v, Schedule) else v) for k, v in setup.items()},
        "threads": args.threads,
        "masked_lm": bench.mlm_name,
        "mlm_top_k": top_k,
        "wall_s": wall,
        "timings": bench.timings,
        "training": bench.training,
        "reference_text": reference_text,
        "references": references,
        "paper_variant": asdict(paper),
        "variants": [{**asdict(v), "label": v.label(), "scores": results[v], "translator_losses": translator_losses[v.label()]}
                     for v in unique],
        "tables": experiments,
        "selection": selection,
        "best": {host: {**asdict(variant), "label": variant.label(), "scores": chosen[host], "targets": checks[host],
                        "perplexity_with_vanilla_block": before_swap[host]}
                 for host, variant in best.items()},
        "refinements": {host: {name: {**asdict(refinements[host][name]), "scores": scores} for name, scores in options.items()}
                        for host, options in refined.items()},
        "paper_targets": paper_checks,
        "gated": {host: {name: {"scores": scores, "targets": gated_target_checks[host][name],
                                "gate_loss": gate_losses[host].get(name)} for name, scores in options.items()}
                  for host, options in gated.items()},
    }
    write_results(args.out, "layer_graft", data, markdown)
    panels = {**{title: cols for title, cols in experiments.items()}, "Best configurations": best_columns}
    host_of = {v: references[v.host.replace("host", "Host")]["perplexity"] for v in unique}
    ratios = {label: results[v]["perplexity"] / host_of[v] for title, variants in wanted.items() for label, v in
              ((f"{title.split('.')[0]}: {name}", v) for name, v in variants.items())}
    ratios.update({f"best, {h}": chosen[h]["perplexity"] / references[h.replace("host", "Host")]["perplexity"] for h in chosen})
    ratios.update({f"best + gate, {h}": gated[h][gated_name]["perplexity"] / host_reference[h]["perplexity"] for h in gated})
    plot(panels, ratios, os.path.join(args.out, "layer_graft.png"))
    print(markdown)


if __name__ == "__main__":
    main()
