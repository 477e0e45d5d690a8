"""The whole feature-scion job: data -> donor -> graft with distillation -> report.

Everything a user can get wrong (a dataset without labels, a label count that differs from the
config, a cut point past the donor, a mismatched donor checkpoint) is checked before any output
directory is created or any training starts.
"""

import os
from dataclasses import dataclass, replace
from typing import Optional

from .. import metrics
from ..errors import HfGraftError
from ..models.configuration_grafted_vision import GraftedVisionConfig
from ..models.modeling_grafted_vision import GraftedModelForImageClassification
from ..reporting import markdown_table, write_results
from .data import ImageSplits, load_image_splits
from .donor import DonorClassifier, donor_model
from .training import TrainingArguments, evaluate_classifier, train_classifier

REPORT_COLUMNS = [
    "model",
    "params",
    "fp32_mb",
    "train_accuracy",
    "val_accuracy",
    "val_loss",
    "train_val_gap",
    "test_accuracy",
]


@dataclass
class VisionGraftResult:
    """What ``graft_vision`` produced: the two models, the data splits and the report rows."""

    donor: DonorClassifier
    grafted: GraftedModelForImageClassification
    splits: ImageSplits
    rows: list


def model_report(name: str, model, splits: ImageSplits, accelerator=None) -> dict:
    """The paper's columns for one model: size, train/val accuracy, val loss, gap, test accuracy."""
    train = evaluate_classifier(model, splits.train, accelerator=accelerator)
    val = evaluate_classifier(model, splits.val, accelerator=accelerator)
    test = evaluate_classifier(model, splits.test, accelerator=accelerator)
    size = metrics.footprint(model)
    return {
        "model": name,
        "params": size["parameters"],
        "fp32_mb": round(size["megabytes"], 2),
        "train_accuracy": train["accuracy"],
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "train_val_gap": train["accuracy"] - val["accuracy"],
        "test_accuracy": test["accuracy"],
    }


def graft_vision(
    config: GraftedVisionConfig,
    output_dir: str,
    *,
    dataset="digits",
    donor_checkpoint: Optional[str] = None,
    donor_pretrained: bool = False,
    donor_args: Optional[TrainingArguments] = None,
    graft_args: Optional[TrainingArguments] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    accelerator=None,
) -> VisionGraftResult:
    """Train (or load) the donor, graft its scion, train the graft with distillation, report.

    ``dataset`` is ``"digits"``, an image folder, a Hub dataset id or already loaded
    ``ImageSplits``.

    Writes ``<output_dir>/donor`` (donor checkpoint), ``<output_dir>/grafted`` (a
    ``save_pretrained`` folder with model card) and ``<output_dir>/report.{json,md}``. A rerun
    resumes the training runs from their last epoch checkpoints.
    """
    if isinstance(dataset, ImageSplits):
        splits = dataset
    else:
        splits = load_image_splits(dataset, config, image_column=image_column, label_column=label_column)
    if len(splits.label_names) != config.num_labels:
        raise HfGraftError(
            f"The dataset {splits.name!r} has {len(splits.label_names)} labels but the config has "
            f"num_labels={config.num_labels}; set num_labels={len(splits.label_names)}."
        )
    config.id2label = dict(enumerate(splits.label_names))
    config.label2id = {name: i for i, name in enumerate(splits.label_names)}
    GraftedModelForImageClassification(config)  # validates the cut point before any work
    donor = donor_model(config, checkpoint=donor_checkpoint, pretrained=donor_pretrained)

    os.makedirs(output_dir, exist_ok=True)
    if donor_checkpoint is None:
        args = replace(donor_args or TrainingArguments(output_dir=""), output_dir=os.path.join(output_dir, "runs", "donor"))
        train_classifier(donor, splits.train, splits.val, args, accelerator=accelerator, description="donor")
        donor.save_pretrained(os.path.join(output_dir, "donor"))
    grafted = GraftedModelForImageClassification.from_donor(donor, config)
    args = replace(graft_args or TrainingArguments(output_dir=""), output_dir=os.path.join(output_dir, "runs", "grafted"))
    train_classifier(grafted, splits.train, splits.val, args, teacher=donor, accelerator=accelerator, description="graft")

    rows = [model_report("donor", donor, splits, accelerator), model_report("grafted", grafted, splits, accelerator)]
    donor_bytes = metrics.footprint(donor)["bytes"]
    rows[1]["size_reduction_percent"] = metrics.footprint(grafted, reference_bytes=donor_bytes)["reduction_percent"]
    grafted.config.graft_dataset = splits.name
    grafted.config.graft_metrics = {
        "test_accuracy": rows[1]["test_accuracy"],
        "val_accuracy": rows[1]["val_accuracy"],
        "donor_test_accuracy": rows[0]["test_accuracy"],
        "size_reduction_percent": rows[1]["size_reduction_percent"],
    }
    grafted.save_pretrained(os.path.join(output_dir, "grafted"))
    write_results(
        output_dir,
        "report",
        {"dataset": splits.name, "config": config.to_dict(), "rows": rows},
        "# Donor vs graft\n\n" + markdown_table(rows, REPORT_COLUMNS + ["size_reduction_percent"]),
    )
    return VisionGraftResult(donor, grafted, splits, rows)
