"""``hf-graft demo vision``: the paper's graft, end to end, offline, in a few minutes on a CPU.

Trains a VGG16 donor on scikit-learn's handwritten digits, grafts its first six convolutions
onto the paper's rootstock head, trains the graft with distillation from the donor, exports it
through Optimum to ONNX and static int8 (when the ``export`` extra is installed), and prints a
table and a size-vs-accuracy plot of donor, graft and int8 graft.
"""

import os

import torch

from . import metrics
from .models.configuration_grafted_vision import GraftedVisionConfig
from .reporting import markdown_table, scatter_plot, write_results
from .vision import TrainingArguments, graft_vision, stack_images
from .vision.pipeline import REPORT_COLUMNS


def _int8_row(result, out_dir: str):
    try:
        from .vision.export import compare_onnx, export_onnx, quantize_int8
    except ImportError:
        return None
    from .errors import HfGraftError

    calibration, _ = stack_images(result.splits.train, 256)
    images, labels = stack_images(result.splits.test)
    folder = os.path.join(out_dir, "onnx")
    try:
        fp32 = export_onnx(result.grafted.eval(), folder, validation_images=images[:32])
    except HfGraftError as error:
        print(f"ONNX export skipped: {error}")
        return None
    int8_path = os.path.join(folder, "model_int8.onnx")
    quantize_int8(fp32["path"], calibration, int8_path)
    comparison = compare_onnx(fp32["path"], int8_path, images, labels)
    donor_bytes = metrics.footprint(result.donor)["bytes"]
    return {
        "model": "grafted int8 (ONNX)",
        "bytes": comparison["int8_bytes"],
        "fp32_mb": round(comparison["int8_bytes"] / 2**20, 2),
        "test_accuracy": comparison["int8_accuracy"],
        "top1_agreement_with_fp32": comparison["top1_agreement"],
        "size_reduction_percent": 100 * (1 - comparison["int8_bytes"] / donor_bytes),
    }


def run_vision_demo(out_dir: str = "hf-graft-demo", *, image_size: int = 32, donor_epochs: int = 4, graft_epochs: int = 4) -> list:
    """Run the demo into ``out_dir``; return the result rows (donor, graft, int8 graft).

    The donor trains in batches of 16: on 1,257 training images, VGG16 from scratch needs the
    steps more than it needs larger batches. The whole demo takes under 3 minutes on two CPU cores.
    """
    torch.manual_seed(0)  # initialisation too, so the demo's figures repeat
    config = GraftedVisionConfig.from_preset("paper", num_labels=10, image_size=image_size)
    result = graft_vision(
        config,
        out_dir,
        dataset="digits",
        donor_args=TrainingArguments(output_dir="", epochs=donor_epochs, batch_size=16, learning_rate=2e-4, distill_weight=0.0),
        graft_args=TrainingArguments(output_dir="", epochs=graft_epochs, batch_size=32, learning_rate=1e-3),
    )
    rows = list(result.rows)
    int8 = _int8_row(result, out_dir)
    if int8 is not None:
        rows.append(int8)
    columns = REPORT_COLUMNS + ["size_reduction_percent"]
    table = markdown_table(rows, columns)
    points = [{"label": row["model"], "x": row["fp32_mb"], "y": row["test_accuracy"]} for row in rows]
    plot = scatter_plot(
        points,
        os.path.join(out_dir, "size_vs_accuracy.png"),
        x="size on disk (MB, log scale)",
        y="test accuracy",
        title="Donor vs graft on digits",
        log_x=True,
        y_range=(0, 1.05),
    )
    write_results(out_dir, "demo", {"rows": rows}, "# hf-graft vision demo\n\n" + table + f"\n\n![size vs accuracy]({os.path.basename(plot)})\n")
    print(table)
    print(
        f"\nInputs are {image_size}x{image_size} (the paper's: 128x128) so the demo trains in minutes on a CPU. "
        "The sizes do not depend on it (global average pooling); they differ from the paper's 1,934,665 "
        "parameters only through the 10 digit labels (the paper has 9)."
    )
    print(f"models, report and plot in {out_dir}/ (size_vs_accuracy.png)")
    if int8 is None:
        print('ONNX export needs the export extra: pip install "hf-graft[export]"')
    return rows
