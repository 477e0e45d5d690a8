"""``hf-graft layers ...``: layer grafting from the command line.

    hf-graft layers specialise --model M --layer I --out DIR [--modulus 4]
    hf-graft layers graft --host H --donor D --donor-layer I --position J --out DIR [--tuned T] [--gate]
    hf-graft layers eval MODEL [--modulus 4] [--mlm bert-base-uncased]

Models are folders or Hub ids with their tokenizer; the task is modular addition
(``"a + b mod n"`` -> ``"The result is x"``); translator data is the task, the embedded corpus, or both;
a gated graft's gate is trained on the task against the embedded corpus.
"""

from __future__ import annotations

import json

from ..errors import HfGraftError


def run(args) -> None:
    """Run the parsed ``layers`` subcommand."""
    {"specialise": _specialise, "graft": _graft, "eval": _evaluate}[args.layers_command](args)


def _load(reference: str, tokenizer: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_graft  # noqa: F401  (registers the grafted causal LM)

    from ..references import checked_reference, checked_tokenizer_source

    source = checked_tokenizer_source(tokenizer or reference)
    model = AutoModelForCausalLM.from_pretrained(checked_reference(reference)).eval()
    return model, AutoTokenizer.from_pretrained(source)


def _specialise(args) -> None:
    from ..causal_lm import Schedule
    from ..data import modular_addition
    from .specialise import specialise_block

    model, tokenizer = _load(args.model)
    schedule = Schedule(steps=args.steps, batch_size=32, learning_rate=args.lr, warmup_steps=min(20, args.steps // 10))
    tuned = specialise_block(model, args.layer, modular_addition(args.modulus), tokenizer=tokenizer, rank=args.rank, schedule=schedule)
    tuned.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"block {args.layer} specialised; model written to {args.out}")


def _graft(args) -> None:
    from ..data import modular_addition, pydoc_corpus
    from ..models.modeling_grafted_causal_lm import GraftedModelForCausalLM
    from .gating import record_openness, train_gate
    from .translators import fit_translators, train_translators, translator_batches

    if args.strategy == "direct" and not args.tuned:
        raise HfGraftError("--strategy direct grafts the tuned block throughout: pass --tuned.")
    host, tokenizer = _load(args.host)
    donor, _ = _load(args.donor)
    tuned = _load(args.tuned)[0] if args.tuned else None
    source = tuned if args.strategy == "direct" else donor
    grafted = GraftedModelForCausalLM.from_models(
        host, source, donor_layer=args.donor_layer, position=args.position,
        translator_init=args.translator_init, donor_name=args.donor, gate=args.gate,
    )
    task = modular_addition(args.modulus)
    data = translator_batches(tokenizer, args.data, task=task, corpus=pydoc_corpus().train)
    if args.translator_init == "least_squares":
        fit_translators(grafted, donor=source, host=host, data=data)
    losses = train_translators(grafted, donor=source, host=host, data=data, loss=args.loss, steps=args.steps)
    if tuned is not None and args.strategy == "original":
        grafted.swap_block(tuned)
    report = {"translator_losses": losses}
    if args.gate:
        task_ids = translator_batches(tokenizer, "task", task=task)
        general_ids = translator_batches(tokenizer, "corpus", corpus=pydoc_corpus().train)
        report["gate_loss"] = train_gate(grafted, task_data=task_ids, general_data=general_ids, steps=args.gate_steps)
        report["gate_openness"] = record_openness(grafted, task_ids, general_ids)
    grafted.config.graft_dataset = f"{args.data} (modular addition n={args.modulus}, pydoc corpus)"
    grafted.save_pretrained(args.out, tokenizer=tokenizer)
    print(json.dumps({**report, "out": args.out}, indent=2))
    if args.push_to_hub:
        print(f"pushed: {grafted.push_to_hub(args.push_to_hub, tokenizer=tokenizer)}")


def _evaluate(args) -> None:
    from ..causal_lm import encode_text
    from ..data import modular_addition, pydoc_corpus
    from .evaluation import language_scores, task_scores, text_prompts

    model, tokenizer = _load(args.model, args.tokenizer)
    task = modular_addition(args.modulus, test_size=args.samples)
    held_out = pydoc_corpus().held_out
    scores = task_scores(model, tokenizer, task.test)
    scores.update(
        language_scores(
            model,
            tokenizer,
            text_prompts(tokenizer, held_out, count=args.samples),
            held_out_ids=encode_text(tokenizer, held_out),
            mlm=args.mlm,
            top_k=args.top_k,
        )
    )
    print(json.dumps(scores, indent=2))
