"""Every GPU path of hf-graft on one device, each checked against the same work on the CPU.

    python scripts/gpu_check.py --device cuda --shape llama-3.2-1b --out bench_results/gpu-check   # one GPU, minutes
    python scripts/gpu_check.py --device cpu --shape small --out bench_results/gpu-check-cpu       # a CPU-only rehearsal

Checks, each run on ``--device`` and on the CPU, with the figure the two must agree on:

- ``streaming``: a data-free SkillPack streamed from two checkpoint folders (``bench_scale``'s pair of
  ``--shape`` with ``--layers`` blocks): relative error and the formats chosen;
- ``block-by-block``: a calibrated pack made one decoder block at a time (statistics, candidate
  search, compression, per-block scale distillation): relative error and the last distillation loss;
- ``apply``: the streaming pack merged into the base checkpoint shard by shard: largest difference
  of a merged weight;
- ``loaded``: a calibrated pack of two loaded tiny models (end-to-end scale distillation):
  relative error and the last distillation loss;
- ``distill-logits``: logit distillation of a tiny student under accelerate: the last loss;
- ``vision``: one epoch of a small graft on the embedded digits: validation accuracy;
- ``translators``: translator training of a tiny layer graft: the last loss of each stage;
- ``throughput``: the per-matrix work of extraction and merging on one MLP matrix of the shape
  (Gram factorization, a merge's low-rank product) in seconds and TFLOP/s, and the share of the
  device's float32 peak the product reaches where the peak is known.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``; exits non-zero when a check disagrees.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be downloaded

import argparse
import copy
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale  # noqa: E402  (the synthetic checkpoint pair)

#: Dense float32 peaks (TFLOP/s, without tensor cores) of devices this check may meet.
FP32_PEAK_TFLOPS = {"H100": 67.0, "H200": 67.0, "A100": 19.5, "L40S": 91.6, "A10G": 31.2}


def timed(work):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def tiny_llama(seed: int, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tuned_copy(base, seed: int = 1):
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.dim() == 2:
                parameter += 0.02 * torch.randn(parameter.shape, generator=generator)
    return tuned


def pack_figures(folder: str) -> dict:
    from hf_graft.skillpack.files import read_config

    config = read_config(os.path.join(folder, "adapter_config.json"))
    measured = config.measured
    kinds = {name: {part: spec["kind"] for part, spec in parts.items()} for name, parts in config.module_specs.items()}
    return {"relative_error": measured["relative_error"], "distill_loss": (measured.get("distill_loss") or [None])[-1], "kinds": kinds}


def check_streaming(device: str, paths: dict, out: str) -> dict:
    import hf_graft.skillpack as sp

    folder = os.path.join(out, f"streaming-{device}")
    shutil.rmtree(folder, ignore_errors=True)
    _, seconds = timed(lambda: sp.extract_skillpack(paths["base"], paths["tuned"], sp.SkillPackConfig(target_ratio=16),
                                                    calibration=None, output_dir=folder, device=device, progress=False))
    return {"seconds": seconds, "folder": folder, **pack_figures(folder)}


def check_block_by_block(device: str, paths: dict, out: str) -> dict:
    import hf_graft.skillpack as sp

    folder = os.path.join(out, f"block-by-block-{device}")
    shutil.rmtree(folder, ignore_errors=True)
    batches = bench_scale.token_batches(paths["vocab"], 16, 0)
    config = sp.SkillPackConfig(target_ratio=16, calibration_samples=16, distill_steps=20)
    _, seconds = timed(lambda: sp.extract_skillpack(paths["base"], paths["tuned"], config, calibration=batches,
                                                    output_dir=folder, device=device, progress=False))
    return {"seconds": seconds, **pack_figures(folder)}


def check_apply(device: str, paths: dict, pack: str, out: str) -> dict:
    from hf_graft.sharded import Checkpoint
    from hf_graft.skillpack.checkpoint_merge import merge_into_checkpoint

    folder = os.path.join(out, f"merged-{device}")
    shutil.rmtree(folder, ignore_errors=True)
    _, seconds = timed(lambda: merge_into_checkpoint(pack, paths["base"], folder, device=device, progress=False))
    return {"seconds": seconds, "checkpoint": Checkpoint(folder)}


def check_loaded(device: str) -> dict:
    import hf_graft.skillpack as sp

    base = tiny_llama(0)
    tuned = tuned_copy(base)
    batches = list(torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0)).split(8))
    config = sp.SkillPackConfig(target_ratio=8, calibration_samples=16, distill_steps=30)
    model, seconds = timed(lambda: sp.extract_skillpack(base, tuned, config, calibration=batches, device=device, progress=False))
    measured = model.peft_config["default"].measured
    return {"seconds": seconds, "relative_error": measured["relative_error"], "distill_loss": measured["distill_loss"][-1]}


def check_distill_logits(device: str) -> dict:
    from accelerate import Accelerator

    from hf_graft.data import modular_addition, train_tokenizer
    from hf_graft.distill.logits import LogitSettings, distill_logits

    task = modular_addition(n=4, train_size=64)
    tokenizer = train_tokenizer([p + a for p, a in task.train] * 4, vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.eos_token or "</s>"
    teacher, student = tiny_llama(0, len(tokenizer)), tiny_llama(1, len(tokenizer))
    accelerator = Accelerator(cpu=device == "cpu")
    settings = LogitSettings(steps=20, batch_size=8, learning_rate=3e-3, checkpoint_every=0)
    result, seconds = timed(lambda: distill_logits(teacher, student, tokenizer, task.train, settings, accelerator=accelerator, progress=False))
    return {"seconds": seconds, "first_loss": result.losses[0], "last_loss": result.losses[-1]}


def check_vision(device: str, out: str) -> dict:
    from accelerate import Accelerator

    import hf_graft
    from hf_graft.vision import TrainingArguments
    from hf_graft.vision.data import load_image_splits
    from hf_graft.vision.training import evaluate_classifier, train_classifier

    config = hf_graft.GraftedVisionConfig.from_preset("paper", num_labels=10, image_size=32)
    splits = load_image_splits("digits", config)
    torch.manual_seed(0)
    model = hf_graft.GraftedModelForImageClassification(config)
    accelerator = Accelerator(cpu=device == "cpu")
    args = TrainingArguments(output_dir=os.path.join(out, f"vision-{device}"), epochs=1, batch_size=32, learning_rate=1e-3,
                             distill_weight=0.0, resume=False)
    _, seconds = timed(lambda: train_classifier(model, splits.train, splits.val, args, accelerator=accelerator))
    return {"seconds": seconds, "val_accuracy": evaluate_classifier(model, splits.val, accelerator=accelerator)["accuracy"]}


def check_translators(device: str) -> dict:
    import hf_graft
    from hf_graft import layers
    from hf_graft.data import modular_addition, train_tokenizer

    task = modular_addition(n=4, train_size=64)
    tokenizer = train_tokenizer([p + a for p, a in task.train] * 4 + ["the quick brown fox jumps"] * 20, vocab_size=300)
    host, donor = tiny_llama(0, len(tokenizer)).to(device), tiny_llama(1, len(tokenizer)).to(device)
    grafted = hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=1, position=1).to(device)
    data = layers.translator_batches(tokenizer, "mixed", task=task, corpus="the quick brown fox jumps " * 200,
                                     batches=4, batch_size=4, seq_len=16)
    data = [batch.to(device) for batch in data]
    result, seconds = timed(lambda: layers.train_translators(grafted, donor=donor, host=host, data=data, steps=30,
                                                             learning_rate=1e-2, progress=False))
    return {"seconds": seconds, **{f"{stage}_last_loss": losses["last"] for stage, losses in result.items()}}


def throughput(device: str, shape: str) -> list:
    from hf_graft.skillpack.compression.lowrank import gram_eigen

    rows, cols = bench_scale.SHAPES[shape]["intermediate_size"], bench_scale.SHAPES[shape]["hidden_size"]
    rank = cols // 4
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(rows, cols, generator=generator).to(device)
    left, right = torch.randn(rows, rank, generator=generator).to(device), torch.randn(rank, cols, generator=generator).to(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = next((value for key, value in FP32_PEAK_TFLOPS.items() if key in name), None)
    found = []
    for work, run, flop in (("Gram factorization (float32)", lambda: gram_eigen(matrix), 2 * cols * cols * rows),
                            (f"merge product at rank {rank}", lambda: left @ right, 2 * rows * cols * rank)):
        run()
        _, seconds = timed(run)
        tflops = flop / seconds / 1e12
        found.append({"device": name, "work": work, "matrix": f"{rows}x{cols}", "seconds": round(seconds, 4),
                      "tflop_per_s": round(tflops, 2), "share_of_fp32_peak": round(tflops / peak, 3) if peak else None})
    return found


def agree(name: str, cpu: dict, device: dict) -> dict:
    """The comparison of one check: the figures side by side and whether they agree."""
    row = {"check": name, "cpu_seconds": round(cpu["seconds"], 2), "device_seconds": round(device["seconds"], 2)}
    if name in ("streaming", "block-by-block", "loaded"):
        row["cpu"], row["device"] = cpu["relative_error"], device["relative_error"]
        row["agree"] = abs(cpu["relative_error"] - device["relative_error"]) <= 0.02
        if name == "streaming":
            same = sum(cpu["kinds"].get(m) == kinds for m, kinds in device["kinds"].items())
            row["formats_same"] = f"{same}/{len(device['kinds'])}"
            row["agree"] = row["agree"] and same >= 0.9 * len(device["kinds"])
        if cpu.get("distill_loss") is not None:
            row["cpu_distill_loss"], row["device_distill_loss"] = cpu["distill_loss"], device["distill_loss"]
    elif name == "apply":
        largest = 0.0
        for key in cpu["checkpoint"].keys():
            largest = max(largest, float((cpu["checkpoint"].read(key).float() - device["checkpoint"].read(key).float()).abs().max()))
        row["cpu"], row["device"], row["agree"] = "merged", f"max |diff| {largest:.3g}", largest <= 1e-2
    elif name == "distill-logits":
        row["cpu"], row["device"] = round(cpu["last_loss"], 4), round(device["last_loss"], 4)
        row["agree"] = abs(cpu["last_loss"] - device["last_loss"]) <= 0.1 * max(cpu["first_loss"], 1e-6)
    elif name == "vision":
        row["cpu"], row["device"] = cpu["val_accuracy"], device["val_accuracy"]
        row["agree"] = abs(cpu["val_accuracy"] - device["val_accuracy"]) <= 0.1
    elif name == "translators":
        row["cpu"], row["device"] = round(cpu["post_last_loss"], 4), round(device["post_last_loss"], 4)
        row["agree"] = abs(cpu["post_last_loss"] - device["post_last_loss"]) <= 0.1 * max(abs(cpu["post_last_loss"]), 1e-3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (cuda, cuda:1, or cpu for a rehearsal)")
    parser.add_argument("--shape", choices=sorted(bench_scale.SHAPES), default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks of the checkpoint pair (each at the shape's own size)")
    parser.add_argument("--out", default="bench_results/gpu-check")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here; use --device cpu for a rehearsal.")
    from hf_graft.reporting import markdown_table, write_results

    os.makedirs(args.out, exist_ok=True)
    fields = bench_scale.shape_config(args.shape, args.layers)
    paths = {**bench_scale.write_pair(fields, os.path.join(args.out, f"checkpoints-{args.shape}-{args.layers}")), "vocab": fields["vocab_size"]}
    started = time.perf_counter()
    rows, results = [], {}
    for name in ("streaming", "block-by-block", "apply", "loaded", "distill-logits", "vision", "translators"):
        sides = {}
        for device in dict.fromkeys(("cpu", args.device)):
            print(f"{name} on {device}", flush=True)
            if name == "streaming":
                sides[device] = check_streaming(device, paths, args.out)
            elif name == "block-by-block":
                sides[device] = check_block_by_block(device, paths, args.out)
            elif name == "apply":
                sides[device] = check_apply(device, paths, results["streaming"]["cpu"]["folder"], args.out)
            elif name == "loaded":
                sides[device] = check_loaded(device)
            elif name == "distill-logits":
                sides[device] = check_distill_logits(device)
            elif name == "vision":
                sides[device] = check_vision(device, args.out)
            else:
                sides[device] = check_translators(device)
        results[name] = sides
        rows.append(agree(name, sides["cpu"], sides[args.device]))
        print(f"  {rows[-1]}", flush=True)
    work = throughput(args.device, args.shape)
    seconds = round(time.perf_counter() - started, 1)
    failed = [row["check"] for row in rows if not row["agree"]]
    data = {"device": args.device, "shape": args.shape, "layers": args.layers, "seconds": seconds, "checks": rows,
            "throughput": work, "failed": failed}
    markdown = (
        f"# hf-graft GPU paths on {args.device} against the CPU\n\n{args.shape} pair with {args.layers} blocks; "
        f"{seconds} s in all.\n\n{markdown_table(rows)}\n\n## Per-matrix work on {args.device}\n\n{markdown_table(work)}\n\n"
        + (f"Disagreeing: {', '.join(failed)}\n" if failed else "Every check agrees with the CPU.\n")
    )
    write_results(args.out, "gpu_check", data, markdown)
    print(markdown)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
