"""SkillPacks at checkpoint scale: memory and time of extraction and merging, in memory and streamed.

1. A synthetic base/tuned pair is written as sharded bf16 safetensors at a real model's shape
   (``--shape``: Llama-3.2-1B by default, ``llama-3-8b`` on demand, ``small`` for a quick look),
   tensor by tensor. Base weights are Gaussian; each delta has a power-law spectrum over its
   top directions plus a full-rank tail (a fine-tune's delta is far from low rank), so every
   candidate format of the pack gets real work.
2. Each run is its own process, its resident memory sampled every 0.1 s (peak RSS of the whole
   process, shared pages and file pages included):
   - ``in-memory``: both checkpoints loaded with transformers in bf16, ``extract_skillpack`` on
     the models (data-free), ``save_pretrained``;
   - ``streaming``: ``extract_skillpack(base_dir, tuned_dir, output_dir=...)``, nothing loaded;
   - ``apply``: ``merge_into_checkpoint`` shard by shard, against ``copy`` (the checkpoint's
     files copied) and ``load`` (``from_pretrained`` of the base in bf16).
   ``--skip-in-memory`` leaves out the run that loads both models (it needs ~4x the checkpoint
   bytes of RAM); ``--apply-only`` runs the merges alone, on the pack an earlier run left.
   ``--layers N`` writes the pair with N decoder blocks, every tensor at the shape's own size (the
   memory of a run is set by its largest tensors; its time grows with the blocks). Each run's
   progress bars, with their time per block, go to ``<run>.log`` beside its output.
3. Throughput of the per-matrix work on one MLP matrix of the shape: randomized SVD, GPTQ at
   4 bits, a merge's product and measuring every candidate format, on the CPU and, when present,
   the GPU.

Writes ``scale.json``, ``scale.md`` and ``scale.png`` (memory over time per run) to ``--out``.

    python scripts/bench_scale.py --shape small --out bench_results/scale-small    # minutes
    python scripts/bench_scale.py --out bench_results/scale                        # Llama-3.2-1B shape
    python scripts/bench_scale.py --shape llama-3-8b --skip-in-memory --out bench_results/scale-8b
    python scripts/bench_scale.py --apply-only --out bench_results/scale                   # merge runs only
    python scripts/bench_scale.py --shape llama-3-8b --layers 2 --skip-in-memory --out bench_results/scale-8b-2-blocks
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be downloaded

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from typing import Optional

import torch

SHAPES = {
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SHARD_BYTES = 1 << 30
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH = 32, 128
DISTILL_STEPS = 50
TOP_DIRECTIONS = 64  # power-law part of each delta
TAIL_SHARE = 0.3  # share of each delta's energy in its full-rank tail


def shape_config(shape: str, layers: Optional[int]) -> dict:
    """The config fields of ``shape``, with ``layers`` decoder blocks instead of its own number if given."""
    return {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}


def write_pair(fields: dict, folder: str) -> dict:
    """The base and tuned checkpoints of a Llama config's ``fields`` under ``folder`` (kept: a rerun reuses them)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_graft.sharded import INDEX_NAME, write_shard

    config = LlamaConfig(**fields, torch_dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    layout = [(name, tuple(p.shape)) for name, p in skeleton.state_dict().items() if not (config.tie_word_embeddings and name == "lm_head.weight")]
    shards, current, size = [], [], 0
    for name, dims in layout:
        nbytes = math.prod(dims) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += nbytes
    shards.append(current)
    paths = {side: os.path.join(folder, side) for side in ("base", "tuned")}
    if all(os.path.isfile(os.path.join(path, INDEX_NAME)) for path in paths.values()):
        return paths
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
        config.save_pretrained(path)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    for shard, file in zip(shards, names):
        made = {}
        for name, dims in shard:
            made[name] = _tensor_pair(dims, generator, is_norm="norm" in name)
        for side, index in (("base", 0), ("tuned", 1)):
            write_shard(os.path.join(paths[side], file), [(n, torch.bfloat16, d) for n, d in shard], lambda n: made[n][index], {"format": "pt"})
        print(f"  wrote {file} ({len(shard)} tensors)", flush=True)
    total = sum(math.prod(d) * 2 for _, d in layout)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for shard, f in zip(shards, names) for n, _ in shard}}
    for path in paths.values():
        with open(os.path.join(path, INDEX_NAME), "w") as handle:
            json.dump(index, handle, indent=2)
    return paths


def _tensor_pair(dims, generator, *, is_norm: bool):
    if is_norm:
        base = torch.ones(dims)
        return base.bfloat16(), (base + 0.01 * torch.randn(dims, generator=generator)).bfloat16()
    rows, cols = dims
    base = 0.02 * torch.randn(dims, generator=generator)
    k = min(TOP_DIRECTIONS, rows, cols)
    spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0
    top = (torch.randn(rows, k, generator=generator) * spectrum) @ torch.randn(k, cols, generator=generator)
    top *= math.sqrt((1 - TAIL_SHARE) / float(top.square().mean()))
    tail = math.sqrt(TAIL_SHARE) * torch.randn(dims, generator=generator)
    delta = 0.002 * (top + tail)  # about 10% of the weights' scale
    return base.bfloat16(), (base + delta).bfloat16()


def token_batches(vocab: int, sequences: int, seed: int) -> list:
    """Random token sequences (the synthetic pair has no tokenizer or text), 8 per batch."""
    ids = torch.randint(0, vocab, (sequences, CALIBRATION_LENGTH), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(8))


def worker(mode: str, paths: dict, out: str, ratio: float) -> dict:
    """One measured run, in this (child) process."""
    import hf_graft.skillpack as sp
    from hf_graft.skillpack.checkpoint_merge import merge_into_checkpoint

    calibrated = mode in ("in-memory-calibrated", "block-by-block")
    config = sp.SkillPackConfig(target_ratio=ratio, calibration_samples=CALIBRATION_SEQUENCES, distill_steps=DISTILL_STEPS)
    calibration = token_batches(paths["vocab"], CALIBRATION_SEQUENCES, 0) if calibrated else None
    start = time.perf_counter()
    if mode in ("in-memory", "in-memory-calibrated"):
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if calibrated else torch.bfloat16  # backward passes need float32
        base, tuned = (AutoModelForCausalLM.from_pretrained(paths[s], dtype=dtype) for s in ("base", "tuned"))
        sp.extract_skillpack(base, tuned, config, calibration=calibration, copy_base=False).save_pretrained(out)
    elif mode in ("streaming", "block-by-block"):
        sp.extract_skillpack(paths["base"], paths["tuned"], config, calibration=calibration, output_dir=out, device="cpu")
    elif mode == "quality":
        return {"seconds": time.perf_counter() - start, "kl": {name: pack_kl(paths, pack) for name, pack in paths["packs"].items()}}
    elif mode == "apply":
        merge_into_checkpoint(paths["pack"], paths["base"], out, device="auto")
    elif mode == "copy":
        shutil.copytree(paths["base"], out)
    elif mode == "load":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16)
    return {"seconds": time.perf_counter() - start}


def pack_kl(paths: dict, pack: Optional[str]) -> float:
    """KL(tuned || base + pack) of next-token distributions on held-out random sequences, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(paths["tuned"], dtype=torch.float32)
    held_out = token_batches(paths["vocab"], 16, 1)
    with torch.no_grad():
        targets = [torch.log_softmax(tuned(ids).logits, -1) for ids in held_out]
    del tuned
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, pack) if pack else model
    with torch.no_grad():
        found = [torch.log_softmax(model(input_ids=ids).logits, -1) for ids in held_out]
    kl = sum(float(torch.nn.functional.kl_div(f, t, log_target=True, reduction="sum")) for f, t in zip(found, targets))
    return round(kl / sum(ids.numel() for ids in held_out), 5)


def measured_run(mode: str, paths: dict, out: str, ratio: float) -> dict:
    """Run ``mode`` in a child process; its wall time, peak RSS and RSS over time."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", mode, "--paths", json.dumps(paths), "--worker-out", out, "--ratio", str(ratio)]
    start = time.perf_counter()
    log = open(f"{out}.log", "w")  # the progress bars, with each stage's time per block
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    process, trace, peak = psutil.Process(child.pid), [], 0
    while child.poll() is None:
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        trace.append((round(time.perf_counter() - start, 2), rss / 2**30))
        time.sleep(0.1)
    output = child.stdout.read()
    log.close()
    if child.returncode:
        raise SystemExit(f"{mode} run failed (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    print(f"  {mode}: {result['seconds']:.1f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    extra = {key: value for key, value in result.items() if key != "seconds"}
    return {"mode": mode, "seconds": round(result["seconds"], 1), "peak_rss_gib": round(peak / 2**30, 3), "trace": trace, **extra}


def product_flop(pack: str) -> float:
    """FLOPs of the low-rank products a merge of ``pack`` computes: ``2 * rows * cols * rank`` per delta."""
    with open(os.path.join(pack, "adapter_config.json")) as handle:
        specs = json.load(handle)["module_specs"]
    return float(sum(2 * math.prod(spec["shape"]) * spec.get("rank", 0) for parts in specs.values() for spec in parts.values()))


def throughput(shape: str) -> list:
    """Seconds per matrix for randomized SVD, 4-bit GPTQ and a merge's product on one MLP matrix of the shape,
    and for measuring every candidate format of it (what streaming extraction does per matrix)."""
    from hf_graft.skillpack.compression.calibrate import quantize_calibrated
    from hf_graft.skillpack.compression.lowrank import lowrank_factors
    from hf_graft.skillpack.compression.objective import ModuleStatistics
    from hf_graft.skillpack.extraction.packing import measure
    from hf_graft.skillpack import SkillPackConfig

    dims = (SHAPES[shape]["intermediate_size"], SHAPES[shape]["hidden_size"])
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        matrix = torch.randn(dims, generator=torch.Generator().manual_seed(0)).to(device)
        stats = ModuleStatistics.identity(dims, device=device)
        rank = min(dims) // 4
        left, right = torch.randn(dims[0], rank, device=device), torch.randn(rank, dims[1], device=device)
        delta = _tensor_pair(dims, torch.Generator().manual_seed(0), is_norm=False)
        delta = (delta[1].float() - delta[0].float()).to(device)
        candidates = lambda: measure("model.layers.0.mlp.down_proj.weight", delta, None, SkillPackConfig(target_ratio=16), conv1d=False)
        for name, work in (("randomized SVD, 10% energy", lambda: lowrank_factors(matrix, energy=0.1)),
                           ("GPTQ 4-bit", lambda: quantize_calibrated(matrix, 4, 128, stats)),
                           (f"float32 product at rank {rank} (merge)", lambda: left @ right),
                           ("every candidate format of a synthetic delta", candidates)):
            if work is not candidates:
                work()  # warm up (measuring the candidates takes minutes on a CPU: once)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            work()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            flop = 2 * dims[0] * dims[1] * rank if "product" in name else None
            rows.append({"device": device, "work": name, "matrix": "x".join(map(str, dims)), "seconds": round(seconds, 3),
                         "gflop_per_s": round(flop / seconds / 1e9, 1) if flop else "-"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--out", default="bench_results/scale")
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--layers", type=int, help="decoder blocks of the pair (default: the shape's own); the tensors keep the shape's sizes")
    parser.add_argument("--skip-in-memory", action="store_true", help="leave out the run that loads both models")
    parser.add_argument("--apply-only", action="store_true", help="only the apply, copy and load runs, on the pack a previous run left in --out")
    parser.add_argument("--calibrated", action="store_true", help="add calibrated extractions (in memory, block by block) and the packs' KL")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.paths), args.worker_out, args.ratio)))
        return
    from hf_graft.reporting import markdown_table, save_figure, write_results
    from hf_graft.sharded import Checkpoint

    os.makedirs(args.out, exist_ok=True)
    fields = shape_config(args.shape, args.layers)
    label = args.shape if not args.layers else f"{args.shape}, {fields['num_hidden_layers']} of {SHAPES[args.shape]['num_hidden_layers']} blocks"
    print(f"writing the {label} pair", flush=True)
    folder = os.path.join(args.out, "checkpoints" if not args.layers else f"checkpoints-{args.layers}-blocks")
    paths = {**write_pair(fields, folder), "vocab": fields["vocab_size"]}
    checkpoint_gib = sum(Checkpoint(paths[s]).file_bytes() for s in ("base", "tuned")) / 2**30
    runs = []
    modes = [] if args.apply_only else ["streaming"] if args.skip_in_memory else ["in-memory", "streaming"]
    if args.calibrated and not args.apply_only:
        modes += ["block-by-block"] if args.skip_in_memory else ["in-memory-calibrated", "block-by-block"]
    if args.apply_only and not os.path.isfile(os.path.join(args.out, "pack-streaming", "adapter_config.json")):
        raise SystemExit(f"--apply-only needs the pack of an earlier run in {args.out}/pack-streaming.")
    for mode in modes:
        runs.append(measured_run(mode, paths, os.path.join(args.out, f"pack-{mode}"), args.ratio))
    if "in-memory" in modes:
        same = all(
            open(os.path.join(args.out, f"pack-{m}", name), "rb").read() == open(os.path.join(args.out, "pack-streaming", name), "rb").read()
            for m in ("in-memory",) for name in ("adapter_config.json", "adapter_model.safetensors")
        )
        print(f"  streaming pack bit-identical to the in-memory pack: {same}")
    else:
        same = None
    applied = {**paths, "pack": os.path.join(args.out, "pack-streaming")}
    for mode in ("apply", "copy", "load"):
        runs.append(measured_run(mode, applied, os.path.join(args.out, f"out-{mode}"), args.ratio))
    for mode in ("apply", "copy"):
        shutil.rmtree(os.path.join(args.out, f"out-{mode}"), ignore_errors=True)
    quality = None
    if args.calibrated and not args.apply_only:
        packs = {"base alone": None, **{m: os.path.join(args.out, f"pack-{m}") for m in modes}}
        quality_run = measured_run("quality", {**paths, "packs": packs}, os.path.join(args.out, "quality"), args.ratio)
        quality = [{"pack": name, "kl_to_tuned": kl} for name, kl in quality_run["kl"].items()]
    by_mode = {run["mode"]: run for run in runs}
    def over(mode: str, other: str) -> Optional[float]:  # None where a run is missing or too short to time
        if mode not in by_mode or not by_mode.get(other, {}).get("seconds"):
            return None
        return round(by_mode[mode]["seconds"] / by_mode[other]["seconds"], 3)

    ratios = {
        "streaming_over_in_memory_time": over("streaming", "in-memory"),
        "apply_over_copy_time": over("apply", "copy"),
        "apply_over_load_time": over("apply", "load"),
        "apply_product_tflop": round(product_flop(applied["pack"]) / 1e12, 3),
    }
    if "block-by-block" in by_mode and "in-memory-calibrated" in by_mode:
        ratios["block_by_block_over_in_memory_calibrated_time"] = over("block-by-block", "in-memory-calibrated")
    work = throughput(args.shape)
    data = {"shape": label, "config": fields, "checkpoint_gib_both": round(checkpoint_gib, 2), "ratio": args.ratio,
            "bit_identical": same, "ratios": ratios, "runs": runs, "quality": quality, "throughput": work, "threads": torch.get_num_threads(),
            "calibration": {"sequences": CALIBRATION_SEQUENCES, "length": CALIBRATION_LENGTH, "distill_steps": DISTILL_STEPS} if quality else None}
    table = [{k: v for k, v in run.items() if k != "trace"} for run in runs]
    markdown = (
        f"# SkillPacks at scale: {label} ({checkpoint_gib:.2f} GiB of bf16 checkpoints, base + tuned)\n\n"
        f"Packs at {args.ratio:g}x, {torch.get_num_threads()} CPU threads. Peak RSS of the whole process. In-memory and streaming "
        f"packs are data-free; calibrated ones see {CALIBRATION_SEQUENCES} random sequences of {CALIBRATION_LENGTH} tokens "
        f"({DISTILL_STEPS} distillation steps: end to end in memory, per block block by block).\n\n"
        f"{markdown_table(table)}\n\nStreaming pack bit-identical to the in-memory pack: {same}\n\n"
        + (f"## How close each pack is to the tuned model\n\nKL(tuned || base + pack) per token on 16 held-out random sequences.\n\n{markdown_table(quality)}\n\n" if quality else "")
        + f"{markdown_table([{'ratio': k, 'value': v} for k, v in ratios.items()])}\n\n## Per-matrix work\n\n{markdown_table(work)}\n"
    )
    write_results(args.out, "scale", data, markdown)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        if run["trace"]:
            ax.plot(*zip(*run["trace"]), label=f"{run['mode']} (peak {run['peak_rss_gib']:.2f} GiB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (GiB)")
    ax.set_title(f"SkillPack extraction and merge, {label} shape")
    ax.legend()
    save_figure(fig, os.path.join(args.out, "scale.png"))
    print(markdown)


if __name__ == "__main__":
    main()
