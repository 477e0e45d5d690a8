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
   - ``mergekit``: ``mergekit-extract-lora`` (the tool users already have; its own venv, found
     with ``--mergekit`` or on ``PATH``, a skip line where absent) at the largest rank whose
     adapter is no larger than the streaming pack, ``--embed-lora``;
   - ``streaming-exhaustive`` (``--ablation``): the same pack with every candidate compressed for
     real instead of predicted (``candidate_search="exhaustive"``);
   - ``forward-backward`` (with ``--calibrated``): one forward and backward pass of the tuned
     model over the calibration set, the part of a calibrated pack no method can skip.
   Each worker reports its resident memory after its imports, so working memory (peak minus
   that) is reported beside the peak. ``--skip-in-memory`` leaves out the run that loads both
   models (it needs ~4x the checkpoint bytes of RAM); ``--apply-only`` runs the merges alone, on
   the pack an earlier run left.
   ``--layers N`` writes the pair with N decoder blocks, every tensor at the shape's own size (the
   memory of a run is set by its largest tensors; its time grows with the blocks). Each run's
   progress bars, with their time per block, go to ``<run>.log`` beside its output.
3. Throughput of the per-matrix work on one MLP matrix of the shape: randomized SVD, GPTQ at
   4 bits, a merge's product and measuring every candidate format, on the CPU and, when present,
   the GPU.

Every pack's KL to the tuned model (mergekit's LoRA included) is measured on held-out sequences.
Writes ``scale.json``, ``scale.md`` and ``scale.png`` (memory over time per run) to ``--out``.

    python scripts/bench_scale.py --shape small --skip-in-memory --calibrated --ablation --mergekit /path/to/venv/bin/mergekit-extract-lora --out bench_results/scale-small
    python scripts/bench_scale.py --out bench_results/scale                        # Llama-3.2-1B shape
    python scripts/bench_scale.py --shape llama-3-8b --cli-only --repeat 1 --out bench_results/scale-8b  # the plain command alone
    python scripts/bench_scale.py --apply-only --out bench_results/scale                   # merge runs only
    python scripts/bench_scale.py --only streaming block-by-block --repeat 1 --out bench_results/scale-1b  # calibrated, 1B shape, API runs alone
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
CALIBRATION = (32, 128)  # sequences, tokens each: the default of --calibration
#: The runs of the library's own API (``--only`` picks among them).
API_MODES = ("in-memory", "streaming", "streaming-exhaustive", "in-memory-calibrated", "block-by-block", "forward-backward")
TOP_DIRECTIONS = 64  # power-law part of each delta
TAIL_SHARE = 0.3  # share of each delta's energy in its full-rank tail


def shape_config(shape: str, layers: Optional[int]) -> dict:
    """The config fields of ``shape``, with ``layers`` decoder blocks instead of its own number if given."""
    return {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}


def write_pair(fields: dict, folder: str) -> dict:
    """The base and tuned checkpoints of a Llama config's ``fields`` under ``folder`` (kept: a rerun reuses them)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_graft.sharded import INDEX_NAME, write_shard

    config = LlamaConfig(**fields, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])  # mergekit reads it
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
        for path in paths.values():
            config.save_pretrained(path)
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


def token_batches(vocab: int, sequences: int, seed: int, length: int = CALIBRATION[1]) -> list:
    """Random token sequences (the synthetic pair has no tokenizer or text), 8 per batch."""
    ids = torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(8))


def worker(mode: str, paths: dict, out: str, ratio: float) -> dict:
    """One measured run, in this (child) process."""
    import psutil

    import hf_graft.skillpack as sp
    from hf_graft.skillpack.checkpoint_merge import merge_into_checkpoint
    from hf_graft.skillpack.extraction import checkpoints  # noqa: F401  (imports counted before the work starts)
    from transformers import AutoModelForCausalLM

    imported = psutil.Process().memory_info().rss
    calibrated = mode in ("in-memory-calibrated", "block-by-block", "forward-backward")
    search = "exhaustive" if mode == "streaming-exhaustive" else "predicted"
    sequences, length = paths.get("calibration", CALIBRATION)
    config = sp.SkillPackConfig(target_ratio=ratio, calibration_samples=sequences, distill_steps=paths.get("distill_steps"),
                                candidate_search=search)
    calibration = token_batches(paths["vocab"], sequences, 0, length) if calibrated else None
    start = time.perf_counter()
    extra = {}
    if mode in ("in-memory", "in-memory-calibrated"):
        dtype = torch.float32 if calibrated else torch.bfloat16  # backward passes need float32
        base, tuned = (AutoModelForCausalLM.from_pretrained(paths[s], dtype=dtype) for s in ("base", "tuned"))
        sp.extract_skillpack(base, tuned, config, calibration=calibration, copy_base=False).save_pretrained(out)
    elif mode in ("streaming", "streaming-exhaustive", "block-by-block"):
        sp.extract_skillpack(paths["base"], paths["tuned"], config, calibration=calibration, output_dir=out, device="cpu")
    elif mode == "forward-backward":
        tuned = AutoModelForCausalLM.from_pretrained(paths["tuned"], dtype=torch.float32)
        extra["load_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        for ids in calibration:
            tuned(input_ids=ids, labels=ids).loss.backward()
    elif mode == "quality":
        return {"seconds": time.perf_counter() - start, "kl": {name: pack_kl(paths, pack) for name, pack in paths["packs"].items()}}
    elif mode == "apply":
        merge_into_checkpoint(paths["pack"], paths["base"], out, device="auto")
    elif mode == "copy":
        shutil.copytree(paths["base"], out)
    elif mode == "load":
        AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16)
    return {"seconds": time.perf_counter() - start, "rss_after_imports": imported, **extra}


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


def measured_run(mode: str, paths: dict, out: str, ratio: float, command: Optional[list] = None) -> dict:
    """Run ``mode`` in a child process (a worker of this script, or ``command``); its wall time, peak RSS and RSS over time.

    A worker reports its own time (from after its imports) and its RSS after imports; a ``command``
    (another tool) is timed whole, from start to exit."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    worker_run = command is None
    if worker_run:
        command = [sys.executable, __file__, "--worker", mode, "--paths", json.dumps(paths), "--worker-out", out, "--ratio", str(ratio)]
    start = time.perf_counter()
    log = open(f"{out}.log", "w")  # the progress bars, with each stage's time per block
    child = subprocess.Popen(command, stdout=subprocess.PIPE if worker_run else log, stderr=log, text=True)
    process, trace, peak = psutil.Process(child.pid), [], 0
    while child.poll() is None:
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        trace.append((round(time.perf_counter() - start, 2), rss / 2**30))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    output = child.stdout.read() if worker_run else ""
    log.close()
    if child.returncode:
        raise SystemExit(f"{mode} run failed (exit {child.returncode}); see {out}.log")
    result = json.loads(output.strip().splitlines()[-1]) if worker_run else {"seconds": wall}
    imported = result.pop("rss_after_imports", None)
    working = f", working memory {(peak - imported) / 2**30:.2f} GiB" if imported else ""
    print(f"  {mode}: {result['seconds']:.1f} s (process {wall:.1f} s), peak RSS {peak / 2**30:.2f} GiB{working}", flush=True)
    extra = {key: value for key, value in result.items() if key != "seconds"}
    return {"mode": mode, "seconds": round(result["seconds"], 1), "process_seconds": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 3),
            "working_gib": round((peak - imported) / 2**30, 3) if imported else None, "trace": trace, **extra}


def fastest(mode: str, paths: dict, out: str, ratio: float, command: list, repeat: int) -> dict:
    """``repeat`` runs of another tool's ``command``, the fastest kept (this machine's timings vary by
    a third from run to run); every run's time is recorded."""
    runs = [measured_run(mode, paths, out, ratio, command=command) for _ in range(repeat)]
    best = min(runs, key=lambda run: run["process_seconds"])
    return {**best, "every_process_seconds": [run["process_seconds"] for run in runs],
            "peak_rss_gib": max(run["peak_rss_gib"] for run in runs)}


def folder_bytes(folder: str) -> int:
    """Bytes of an adapter: its weights and its config."""
    return sum(os.path.getsize(os.path.join(folder, name)) for name in ("adapter_model.safetensors", "adapter_config.json"))


def mergekit_rank(fields: dict, budget: int) -> int:
    """The largest rank whose ``mergekit-extract-lora --embed-lora`` adapter is no larger than ``budget`` bytes:
    bf16 factors of every projection, the embedding and the head (extracted even when tied), norms saved whole."""
    hidden, inner, layers = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]
    kv = hidden // fields["num_attention_heads"] * fields["num_key_value_heads"]
    per_layer = 2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inner)
    per_rank = 2 * (layers * per_layer + 2 * (fields["vocab_size"] + hidden))
    fixed = 2 * hidden * (2 * layers + 1) + 200 * (7 * 2 * layers + 6) + 2048  # norms, header entries, config
    return max(1, (budget - fixed) // per_rank)


def find_mergekit(given: Optional[str]) -> Optional[str]:
    found = given or shutil.which("mergekit-extract-lora")
    return found if found and os.path.isfile(found) else None


def product_flop(pack: str) -> float:
    """FLOPs of the low-rank products a merge of ``pack`` computes: ``2 * rows * cols * rank`` per delta."""
    from hf_graft.skillpack.files import read_config

    specs = read_config(os.path.join(pack, "adapter_config.json")).module_specs
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
    parser.add_argument("--calibrated", action="store_true", help="add calibrated extractions (in memory, block by block) and one forward and backward pass")
    parser.add_argument("--ablation", action="store_true", help="add the streaming pack with every candidate compressed for real (slow)")
    parser.add_argument("--mergekit", help="path of mergekit-extract-lora (default: the one on PATH); its own venv")
    parser.add_argument("--cli-only", action="store_true", help="only the plain command, data-free (and mergekit beside it): no API, merge or quality runs, for the largest shapes")
    parser.add_argument("--calibration", type=lambda text: tuple(int(part) for part in text.split("x")), default=CALIBRATION,
                        help="calibration sequences x tokens each (default 32x128; the plain command's own default is 128x256)")
    parser.add_argument("--distill-steps", type=int, help="scale distillation steps of calibrated packs (default: the library's, 200 end to end in memory, none block by block)")
    parser.add_argument("--only", nargs="+", choices=API_MODES, help="only these API runs: no command-line, mergekit, merge or quality runs (e.g. block-by-block on the largest shapes)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the hf-graft and mergekit commands, the fastest reported (default 3)")
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
    sequences, length = args.calibration
    paths = {**write_pair(fields, folder), "vocab": fields["vocab_size"], "distill_steps": args.distill_steps, "calibration": [sequences, length]}
    checkpoint_gib = sum(Checkpoint(paths[s]).file_bytes() for s in ("base", "tuned")) / 2**30
    runs = []
    modes = [] if args.apply_only or args.cli_only else ["streaming"] if args.skip_in_memory else ["in-memory", "streaming"]
    if args.ablation and not (args.apply_only or args.cli_only):
        modes.append("streaming-exhaustive")
    if args.calibrated and not (args.apply_only or args.cli_only):
        modes += ["block-by-block", "forward-backward"] if args.skip_in_memory else ["in-memory-calibrated", "block-by-block", "forward-backward"]
    modes = args.only or modes
    if args.apply_only and not os.path.isfile(os.path.join(args.out, "pack-streaming", "adapter_config.json")):
        raise SystemExit(f"--apply-only needs the pack of an earlier run in {args.out}/pack-streaming.")
    for mode in modes:
        runs.append(measured_run(mode, paths, os.path.join(args.out, f"pack-{mode}"), args.ratio))
    mergekit = find_mergekit(args.mergekit)
    packs = {"base alone": None, **{m: os.path.join(args.out, f"pack-{m}") for m in modes if m != "forward-backward"}}
    if not (args.apply_only or args.only):  # the command a user types, timed whole as mergekit's is
        out = os.path.join(args.out, "pack-cli")
        command = [sys.executable, "-m", "hf_graft_cli", "skillpack", "extract", "--base", paths["base"], "--tuned", paths["tuned"],
                   "--out", out, "--calibration", "none", "--ratio", str(args.ratio), "--device", "cpu"]
        runs.append(fastest("cli", paths, out, args.ratio, command, args.repeat))
        packs["cli"] = out
    if args.apply_only or args.only:
        pass
    elif mergekit is None:
        print("  mergekit: skipped (mergekit-extract-lora not found; pip install mergekit in its own venv and pass --mergekit PATH)")
    else:
        rank = mergekit_rank(fields, folder_bytes(packs["streaming" if "streaming" in packs else "cli"]))
        out = os.path.join(args.out, "pack-mergekit")
        command = [mergekit, "--model", paths["tuned"], "--base-model", paths["base"], "--out-path", out,
                   "--max-rank", str(rank), "--embed-lora", "--quiet"]
        runs.append({**fastest("mergekit", paths, out, args.ratio, command, args.repeat), "rank": rank})
        packs["mergekit"] = out
    for run in runs:
        if run["mode"] in packs and packs[run["mode"]]:
            run["adapter_bytes"] = folder_bytes(packs[run["mode"]])
    if {"in-memory", "streaming"} <= set(modes):
        same = all(
            open(os.path.join(args.out, f"pack-{m}", name), "rb").read() == open(os.path.join(args.out, "pack-streaming", name), "rb").read()
            for m in ("in-memory",) for name in ("adapter_config.json", "adapter_model.safetensors")
        )
        print(f"  streaming pack bit-identical to the in-memory pack: {same}")
    else:
        same = None
    applied = {**paths, "pack": os.path.join(args.out, "pack-streaming")}
    for mode in () if args.cli_only or args.only else ("apply", "copy", "load"):
        runs.append(measured_run(mode, applied, os.path.join(args.out, f"out-{mode}"), args.ratio))
    for mode in ("apply", "copy"):
        shutil.rmtree(os.path.join(args.out, f"out-{mode}"), ignore_errors=True)
    quality = None
    if not (args.apply_only or args.cli_only or args.only) and checkpoint_gib < 6:  # the tuned model and the base in float32, side by side
        quality_run = measured_run("quality", {**paths, "packs": packs}, os.path.join(args.out, "quality"), args.ratio)
        quality = [{"pack": name, "kl_to_tuned": value, "bytes": folder_bytes(packs[name]) if packs[name] else 0}
                   for name, value in quality_run["kl"].items()]
        for run in runs:
            if run["mode"] in quality_run["kl"]:
                run["kl_to_tuned"] = quality_run["kl"][run["mode"]]
        print(f"  KL to the tuned model: {quality_run['kl']}", flush=True)
    chosen = {}
    if "streaming-exhaustive" in modes:
        from hf_graft.skillpack.files import read_config

        specs = {m: read_config(os.path.join(args.out, f"pack-{m}", "adapter_config.json")).module_specs for m in ("streaming", "streaming-exhaustive")}
        changed = sorted(name for name in specs["streaming"] if specs["streaming"][name] != specs["streaming-exhaustive"].get(name))
        chosen = {"modules": len(specs["streaming"]), "formats_changed": len(changed), "changed": changed[:10]}
    by_mode = {run["mode"]: run for run in runs}
    def over(mode: str, other: str) -> Optional[float]:  # None where a run is missing or too short to time
        if mode not in by_mode or not by_mode.get(other, {}).get("seconds"):
            return None
        return round(by_mode[mode]["seconds"] / by_mode[other]["seconds"], 3)

    def process_over(mode: str, other: str) -> Optional[float]:
        if mode not in by_mode or other not in by_mode:
            return None
        return round(by_mode[mode]["process_seconds"] / by_mode[other]["process_seconds"], 3)

    def peak_over(mode: str, other: str) -> Optional[float]:
        if mode not in by_mode or other not in by_mode:
            return None
        return round(by_mode[mode]["peak_rss_gib"] / by_mode[other]["peak_rss_gib"], 3)

    def kl_over(mode: str, other: str) -> Optional[float]:
        found = [by_mode.get(m, {}).get("kl_to_tuned") for m in (mode, other)]
        return round(found[0] / found[1], 3) if None not in found and found[1] else None

    ratios = {
        "streaming_over_in_memory_time": over("streaming", "in-memory"),
        "cli_over_mergekit_time": process_over("cli", "mergekit"),
        "cli_over_mergekit_peak_rss": peak_over("cli", "mergekit"),
        "streaming_over_mergekit_kl": kl_over("streaming", "mergekit"),
        "exhaustive_over_predicted_time": over("streaming-exhaustive", "streaming"),
        "block_by_block_over_mergekit_peak_rss": peak_over("block-by-block", "mergekit"),
        "apply_over_copy_time": over("apply", "copy"),
        "apply_over_load_time": over("apply", "load"),
    }
    if not (args.cli_only or args.only):
        ratios["apply_product_tflop"] = round(product_flop(applied["pack"]) / 1e12, 3)
    if {"block-by-block", "forward-backward", "streaming"} <= set(by_mode):
        floor = by_mode["streaming"]["seconds"] + by_mode["forward-backward"]["seconds"]
        ratios["block_by_block_over_data_free_plus_forward_backward_time"] = round(by_mode["block-by-block"]["seconds"] / floor, 3)
    if "block-by-block" in by_mode and "in-memory-calibrated" in by_mode:
        ratios["block_by_block_over_in_memory_calibrated_time"] = over("block-by-block", "in-memory-calibrated")
    ratios = {key: value for key, value in ratios.items() if value is not None}
    work = throughput(args.shape)
    data = {"shape": label, "config": fields, "checkpoint_gib_both": round(checkpoint_gib, 2), "ratio": args.ratio,
            "bit_identical": same, "ratios": ratios, "runs": runs, "quality": quality, "predicted_vs_exhaustive": chosen or None,
            "throughput": work, "threads": torch.get_num_threads(),
            "calibration": {"sequences": sequences, "length": length, "distill_steps": args.distill_steps} if quality else None}
    table = [{k: v for k, v in run.items() if k != "trace"} for run in runs]
    steps = args.distill_steps
    distill = (f"{steps} distillation steps: end to end in memory, per block block by block" if steps is not None
               else "scale distillation as the library does unset: 200 steps end to end in memory, none block by block")
    markdown = (
        f"# SkillPacks at scale: {label} ({checkpoint_gib:.2f} GiB of bf16 checkpoints, base + tuned)\n\n"
        f"Packs at {args.ratio:g}x, {torch.get_num_threads()} CPU threads. Peak RSS of the whole process. In-memory and streaming "
        f"packs are data-free; calibrated ones see {sequences} random sequences of {length} tokens "
        f"({distill}).\n\n"
        f"`cli` is `hf-graft skillpack extract --calibration none` and `mergekit` is `mergekit-extract-lora --embed-lora` at the "
        f"largest rank no larger than the streaming pack (`adapter_bytes`: weights + config), each the fastest of {args.repeat} runs "
        f"(`every_process_seconds`), timed whole. `seconds` is the work after imports for hf-graft's API runs (`process_seconds`: "
        f"the whole process); `working_gib` is peak RSS minus the RSS after imports.\n\n"
        f"{markdown_table(table)}\n\nStreaming pack bit-identical to the in-memory pack: {same}\n\n"
        + (f"## Predicted against exhaustive candidate search\n\nFormats that differ: {chosen['formats_changed']} of {chosen['modules']} "
           f"modules {chosen['changed']}; exhaustive / predicted time: {ratios.get('exhaustive_over_predicted_time')}.\n\n" if chosen else "")
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
