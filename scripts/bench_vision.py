"""Donor vs feature-scion grafts vs int8 ONNX graft, in one run on the embedded digits.

For each model: parameters, bytes, FLOPs, test accuracy and CPU latency at batch 1 and 32
(PyTorch eager; ONNX Runtime for the exported graft), all as ratios to the donor measured in the
same run. Writes ``vision.json``, ``vision.md`` and ``vision.png`` to ``--out``.

    python scripts/bench_vision.py --quick        # under 2 minutes on 2 CPU cores
    python scripts/bench_vision.py                # longer training, more timing repeats
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import hf_graft
from hf_graft import metrics
from hf_graft.reporting import markdown_table, scatter_plot, write_results
from hf_graft.vision import TrainingArguments, donor_model, evaluate_classifier, graft_vision, load_digits_splits, stack_images


def eager_latency_ms(model, batch: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(batch)
            if i >= 2:  # two warm-up passes
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def onnx_latency_ms(session, batch: np.ndarray, repeats: int) -> float:
    name = session.get_inputs()[0].name
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        session.run(None, {name: batch})
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def flops(model, batch: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(batch)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (under 2 minutes)")
    parser.add_argument("--out", default="bench_results/vision")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # initialisation too, so a rerun gives the same accuracies
    epochs, repeats = (2, 5) if args.quick else (6, 20)
    runs = os.path.join(args.out, "runs")

    config = hf_graft.GraftedVisionConfig.from_preset("paper", num_labels=10, image_size=args.image_size)
    splits = load_digits_splits(config)
    train = dict(output_dir="", epochs=epochs, batch_size=32)
    paper = graft_vision(
        config,
        os.path.join(runs, "paper"),
        dataset=splits,
        donor_args=TrainingArguments(**train, learning_rate=1e-4, distill_weight=0.0),
        graft_args=TrainingArguments(**train, learning_rate=1e-3),
    )
    rootstock_config = hf_graft.GraftedVisionConfig.from_preset(
        "paper-mobilenetv2", num_labels=10, image_size=args.image_size
    )
    with_rootstock = graft_vision(
        rootstock_config,
        os.path.join(runs, "paper-mobilenetv2"),
        dataset=splits,
        donor_checkpoint=os.path.join(runs, "paper", "donor"),
        graft_args=TrainingArguments(**train, learning_rate=1e-3),
    )

    images, labels = stack_images(splits.test)
    one, many = images[:1], images[:32]
    models = {"donor": paper.donor, "grafted (paper)": paper.grafted, "grafted + mobilenetv2_050": with_rootstock.grafted}
    rows = []
    for name, model in models.items():
        rows.append(
            {
                "model": name,
                "params": metrics.footprint(model)["parameters"],
                "bytes": metrics.footprint(model)["bytes"],
                "mflops_b1": flops(model, one) / 1e6,
                "test_accuracy": evaluate_classifier(model, splits.test)["accuracy"],
                "eager_ms_b1": eager_latency_ms(model, one, repeats),
                "eager_ms_b32": eager_latency_ms(model, many, max(3, repeats // 4)),
            }
        )

    try:
        from hf_graft.vision.export import compare_onnx, export_onnx, onnx_session, quantize_int8
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        try:
            folder = os.path.join(args.out, "onnx")
            fp32 = export_onnx(paper.grafted.eval(), folder, validation_images=many)
            calibration, _ = stack_images(splits.train, 256)
            int8 = quantize_int8(fp32["path"], calibration, os.path.join(folder, "model_int8.onnx"))
            comparison = compare_onnx(fp32["path"], int8["path"], images, labels)
            for name, path, accuracy, size in (
                ("grafted fp32 (ONNX)", fp32["path"], comparison["fp32_accuracy"], fp32["bytes"]),
                ("grafted int8 (ONNX)", int8["path"], comparison["int8_accuracy"], int8["bytes"]),
            ):
                session = onnx_session(path, threads=args.threads)
                rows.append(
                    {
                        "model": name,
                        "params": rows[1]["params"],
                        "bytes": size,
                        "mflops_b1": rows[1]["mflops_b1"],
                        "test_accuracy": accuracy,
                        "ort_ms_b1": onnx_latency_ms(session, one.numpy(), repeats),
                        "ort_ms_b32": onnx_latency_ms(session, many.numpy(), max(3, repeats // 4)),
                        "int8_top1_agreement": comparison["top1_agreement"] if "int8" in name else None,
                    }
                )
        except hf_graft.HfGraftError as error:
            print(f"ONNX rows skipped: {error}")

    donor = rows[0]
    for row in rows:
        row["size_vs_donor"] = row["bytes"] / donor["bytes"]
        row["reduction_percent"] = 100 * (1 - row["bytes"] / donor["bytes"])
        row["accuracy_minus_donor"] = row["test_accuracy"] - donor["test_accuracy"]
        row["flops_vs_donor"] = row["mflops_b1"] / donor["mflops_b1"]
        latency = row.get("eager_ms_b1") or row.get("ort_ms_b1")
        row["speedup_b1_vs_donor_eager"] = donor["eager_ms_b1"] / latency
        latency32 = row.get("eager_ms_b32") or row.get("ort_ms_b32")
        row["speedup_b32_vs_donor_eager"] = donor["eager_ms_b32"] / latency32

    columns = [
        "model", "params", "bytes", "reduction_percent", "flops_vs_donor", "test_accuracy", "accuracy_minus_donor",
        "eager_ms_b1", "eager_ms_b32", "ort_ms_b1", "ort_ms_b32",
        "speedup_b1_vs_donor_eager", "speedup_b32_vs_donor_eager", "int8_top1_agreement",
    ]
    graft, int8_row = rows[1], next((r for r in rows if "int8" in r["model"]), None)
    # The donor's flatten layer grows with the input: at the paper's geometry (128x128, 9 labels)
    # the same graft is 88.54% smaller, at 32x32 less. Sizes need no training, so report both.
    paper_config = hf_graft.GraftedVisionConfig.from_preset("paper", num_labels=9, image_size=128)
    paper_reduction = metrics.footprint(
        hf_graft.GraftedModelForImageClassification(paper_config),
        reference_bytes=metrics.footprint(donor_model(paper_config))["bytes"],
    )["reduction_percent"]
    targets = [
        {"target": "graft >= 88.5% smaller than the donor (paper geometry, 128x128, 9 labels)", "measured": f"{paper_reduction:.2f}%", "met": paper_reduction >= 88.5},
        {"target": f"graft >= 88.5% smaller than the donor (this run, {args.image_size}x{args.image_size})", "measured": f"{graft['reduction_percent']:.2f}%", "met": graft["reduction_percent"] >= 88.5},
        {"target": "graft accuracy >= donor's", "measured": f"{graft['accuracy_minus_donor']:+.4f}", "met": graft["accuracy_minus_donor"] >= 0},
    ]
    if int8_row is not None:
        fp32_row = next(r for r in rows if "fp32 (ONNX)" in r["model"])
        targets += [
            {"target": "int8 >= 96% smaller than the donor", "measured": f"{int8_row['reduction_percent']:.2f}%", "met": int8_row["reduction_percent"] >= 96},
            {"target": "int8 <= 1 point below graft fp32", "measured": f"{int8_row['test_accuracy'] - fp32_row['test_accuracy']:+.4f}", "met": int8_row["test_accuracy"] >= fp32_row["test_accuracy"] - 0.01},
            {"target": "int8 >= 3x faster than the donor at batch 1", "measured": f"{int8_row['speedup_b1_vs_donor_eager']:.2f}x", "met": int8_row["speedup_b1_vs_donor_eager"] >= 3},
        ]
    markdown = (
        f"# Vision graft benchmark (digits, {args.image_size}x{args.image_size}, {args.threads} threads, "
        f"{'quick' if args.quick else 'full'})\n\n"
        + markdown_table(rows, columns)
        + "\n\n## Targets\n\n"
        + markdown_table(targets, ["target", "measured", "met"])
        + "\n\n![size vs accuracy](vision.png)\n"
    )
    write_results(args.out, "vision", {"image_size": args.image_size, "threads": args.threads, "quick": args.quick, "rows": rows, "targets": targets}, markdown)
    scatter_plot(
        [{"label": r["model"], "x": r["bytes"] / 2**20, "y": r["test_accuracy"]} for r in rows],
        os.path.join(args.out, "vision.png"),
        x="size (MB, log scale)",
        y="test accuracy",
        title="Donor vs grafts on digits",
        log_x=True,
    )
    print(markdown)


if __name__ == "__main__":
    main()
