"""Vision-graft recipes (``kind: vision_graft``): a feature-scion graft from one YAML file, run by ``hf-graft run``.

A recipe names the donor, the graft (a preset of :class:`GraftedVisionConfig` and any of its
fields), the data, the two training runs, the edge export and where to push::

    kind: vision_graft
    output_dir: runs/digits-graft       # everything the job writes goes here (relative to the cwd)
    seed: 0
    donor: {name: vgg16, pretrained: false}   # a timm name (default: the preset's), timm's pretrained
                                              # weights, or checkpoint: a donor folder an earlier run saved
    graft: {preset: paper, image_size: 32}    # GraftedVisionConfig.from_preset(preset, **the other keys)
    data: {dataset: digits, limit: null}      # digits | an image folder | a Hub dataset id, with
                                              # image_column / label_column; limit: images per split
    training:                                 # hf_graft.vision.TrainingArguments fields
      donor: {epochs: 4, batch_size: 16, learning_rate: 2.0e-4}        # plain cross-entropy
      graft: {epochs: 4, batch_size: 32, learning_rate: 1.0e-3, distill_weight: 0.5}
    export: {int8: true, calibration_samples: 256, opset: null}   # ONNX through Optimum; false: none
    push_to_hub: org/grafted-digits     # optional: the graft, and its ONNX files under onnx/

The job: 1. the data; 2. the donor trained (unless a checkpoint is given), its scion grafted and
the graft trained with the donor's help (:func:`hf_graft.vision.graft_vision`, which resumes each
run from its last epoch); 3. the export: ``onnx/model.onnx`` checked against PyTorch in ONNX
Runtime, and ``onnx/model_int8.onnx`` statically quantized on training images, with their
agreement on the test split; 4. the push, with the model card. The report (``report.json``) holds
the donor and graft rows (size, accuracies) and the export's figures.

Everything is checked before any training: unknown keys, the config (timm names, the cut point),
the training settings, the data source, and the ``export`` extra when an export is asked for. A
rerun of the same recipe resumes after the last finished step; a folder made by another recipe
is refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import HfGraftError
from .common import MARKER, Job, check_keys, dataclass_settings

__all__ = ["VisionGraftRecipe", "load", "run"]

SECTIONS = ("kind", "output_dir", "seed", "donor", "graft", "data", "training", "export", "push_to_hub")
STEPS = ["data", "graft", "export"]
_DONOR_KEYS = ("name", "pretrained", "checkpoint")
_DATA_KEYS = ("dataset", "image_column", "label_column", "limit")
_EXPORT = {"int8": True, "calibration_samples": 256, "opset": None}
_DONOR_TRAINING = {"distill_weight": 0.0}  # the donor learns from the labels alone


@dataclass
class VisionGraftRecipe:
    """A checked vision-graft recipe (see the module docstring); build it with :func:`load`."""

    output_dir: str
    graft: dict
    donor: dict
    data: dict
    training: dict
    export: Optional[dict]
    seed: int = 0
    push_to_hub: Optional[str] = None
    raw: dict = field(default_factory=dict)

    def config(self, num_labels: Optional[int] = None):
        """The graft's :class:`GraftedVisionConfig` (``num_labels`` from the data when given)."""
        from ..models.configuration_grafted_vision import GraftedVisionConfig

        settings = dict(self.graft)
        preset = settings.pop("preset", "paper")
        if self.donor.get("name"):
            settings["donor_name"] = self.donor["name"]
        if num_labels is not None:
            settings["num_labels"] = num_labels
        return GraftedVisionConfig.from_preset(preset, **settings)


def load(raw: dict, *, output_dir: Optional[str] = None) -> VisionGraftRecipe:
    """Check a parsed ``kind: vision_graft`` recipe without training anything; the first problem raises."""
    from ..vision import TrainingArguments

    check_keys("", raw, SECTIONS, required=("graft",))
    output_dir = output_dir or raw.get("output_dir")
    if not output_dir:
        raise HfGraftError("recipe: output_dir is required (or pass --out).")
    donor = dict(check_keys("donor", raw.get("donor") or {}, _DONOR_KEYS))
    checkpoint = donor.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(os.path.join(str(checkpoint), "config.json")):
        raise HfGraftError(f"recipe: donor.checkpoint {checkpoint!r} is not a donor folder saved by an earlier run (no config.json).")
    graft = dict(check_keys("graft", raw["graft"] or {}, ("preset",) + _config_fields()))
    data = {"dataset": "digits", "image_column": None, "label_column": None, "limit": None,
            **check_keys("data", raw.get("data") or {}, _DATA_KEYS)}
    _check_data(data)
    training_raw = check_keys("training", raw.get("training") or {}, ("donor", "graft"))
    training = {}
    for run_name in ("donor", "graft"):
        values = {**(_DONOR_TRAINING if run_name == "donor" else {}), **(training_raw.get(run_name) or {})}
        if "output_dir" in values:
            raise HfGraftError(f"recipe: training.{run_name}.output_dir: the runs go under the recipe's output_dir.")
        dataclass_settings(f"training.{run_name}", TrainingArguments, {"output_dir": "", **values})
        training[run_name] = values
    export_raw = raw.get("export", {})
    export = None if export_raw is False or export_raw is None else {**_EXPORT, **check_keys("export", export_raw, tuple(_EXPORT))}
    if export is not None:
        _check_export_extra()
    recipe = VisionGraftRecipe(output_dir=str(output_dir), graft=graft, donor=donor, data=data, training=training,
                               export=export, seed=raw.get("seed", 0), push_to_hub=raw.get("push_to_hub"), raw=raw)
    try:
        config = recipe.config()
        from ..models.modeling_grafted_vision import GraftedModelForImageClassification

        GraftedModelForImageClassification(config)  # builds the scion: checks the cut point
    except (TypeError, ValueError) as error:
        raise HfGraftError(f"recipe: graft: {error}") from error
    return recipe


def _config_fields() -> tuple:
    from ..models.configuration_grafted_vision import GraftedVisionConfig

    return tuple(name for name in inspect.signature(GraftedVisionConfig.__init__).parameters if name not in ("self", "kwargs"))


def _check_data(data: dict) -> None:
    dataset = data["dataset"]
    if not isinstance(dataset, str) or not dataset:
        raise HfGraftError(f"recipe: data.dataset must be digits, an image folder or a Hub dataset id, got {dataset!r}.")
    if dataset != "digits" and not os.path.isdir(dataset) and (dataset.startswith((".", "/")) or dataset.count("/") != 1):
        raise HfGraftError(f"recipe: data.dataset {dataset!r} is neither digits, an image folder here, nor a Hub dataset id like org/name.")
    limit = data["limit"]
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise HfGraftError(f"recipe: data.limit must be a positive number of images per split, got {limit!r}.")


def _check_export_extra() -> None:
    missing = [name for name in ("optimum", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise HfGraftError(
            f"recipe: export needs the export extra ({', '.join(missing)} not installed): "
            "pip install 'hf-graft[export]', or set export: false."
        )


def _splits(recipe: VisionGraftRecipe):
    from torch.utils.data import Subset

    from ..vision import load_image_splits

    data = recipe.data
    splits = load_image_splits(data["dataset"], recipe.config(), image_column=data["image_column"], label_column=data["label_column"])
    if data["limit"]:
        cut = {name: Subset(getattr(splits, name), range(min(data["limit"], len(getattr(splits, name))))) for name in ("train", "val", "test")}
        splits = dataclasses.replace(splits, **cut)
    return splits


def run(recipe: VisionGraftRecipe, *, progress: bool = True) -> dict:
    """Run a checked vision-graft recipe end to end; return its report (also ``report.json``)."""
    import torch
    from transformers import AutoModelForImageClassification

    from ..reporting import markdown_table, write_results
    from ..vision import TrainingArguments, graft_vision
    from ..vision.pipeline import REPORT_COLUMNS

    job = Job(recipe, progress, STEPS)
    splits = _splits(recipe)
    job.say("data", f"{splits.name}: {len(splits.train)} / {len(splits.val)} / {len(splits.test)} images, {len(splits.label_names)} labels")
    config = recipe.config(num_labels=len(splits.label_names))
    record = {"graft": recipe.graft, "donor": recipe.donor, "data": recipe.data, "training": recipe.training, "seed": recipe.seed}
    directory = job.out / "grafted"
    if job.done(directory, record):
        job.say("graft", f"done earlier, loading {directory}")
        rows = json.loads((directory / MARKER).read_text(encoding="utf-8"))["rows"]
    else:
        job.say("graft", f"{config.donor_name} donor, scion up to {config.scion_cut}, rootstock {config.rootstock or 'the paper head'}")
        torch.manual_seed(recipe.seed)
        result = graft_vision(
            config, str(job.out), dataset=splits, donor_checkpoint=recipe.donor.get("checkpoint"),
            donor_pretrained=bool(recipe.donor.get("pretrained")),
            donor_args=TrainingArguments(output_dir="", seed=recipe.seed, **recipe.training["donor"]),
            graft_args=TrainingArguments(output_dir="", seed=recipe.seed, **recipe.training["graft"]),
        )
        rows = result.rows
        job.finish(directory, record, rows=rows)
    grafted = AutoModelForImageClassification.from_pretrained(directory).eval()
    if job.progress:
        print(markdown_table(rows, REPORT_COLUMNS))
    report: dict[str, Any] = {"output_dir": str(job.out), "grafted": str(directory), "dataset": splits.name, "rows": rows}
    if recipe.export is not None:
        report["export"] = _export(job, recipe, grafted, splits, record)
    if recipe.push_to_hub:
        report["pushed"] = _push(recipe, grafted, job.out / "onnx" if recipe.export is not None else None)
        job.say("export", f"pushed to {report['pushed']}")
    write_results(str(job.out), "report", report, "# Donor vs graft\n\n" + markdown_table(rows, REPORT_COLUMNS + ["size_reduction_percent"]))
    return report


def _export(job: Job, recipe: VisionGraftRecipe, grafted, splits, graft_record: dict) -> dict:
    """ONNX (and int8) files of the graft under ``<output_dir>/onnx``, made once; their report."""
    from ..vision import stack_images
    from ..vision.export import compare_onnx, export_onnx, quantize_int8

    settings = recipe.export
    directory = job.out / "onnx"
    record = {"graft": graft_record, "export": settings}
    if job.done(directory, record):
        job.say("export", f"done earlier, in {directory}")
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))["report"]
    job.say("export", "ONNX through Optimum" + (", then static int8" if settings["int8"] else ""))
    images, labels = stack_images(splits.test)
    report = {"fp32": export_onnx(grafted, directory, opset=settings["opset"], validation_images=images[:32])}
    if settings["int8"]:
        calibration, _ = stack_images(splits.train, settings["calibration_samples"])
        int8_path = os.path.join(directory, "model_int8.onnx")
        report["int8"] = quantize_int8(report["fp32"]["path"], calibration, int8_path)
        report["comparison"] = compare_onnx(report["fp32"]["path"], int8_path, images, labels)
    report = json.loads(json.dumps(report, default=str))
    job.finish(directory, record, report=report)
    return report


def _push(recipe: VisionGraftRecipe, grafted, onnx_dir) -> str:
    """The graft with its card; its ONNX files (when exported) under ``onnx/`` in the same repo."""
    from huggingface_hub import HfApi

    url = str(grafted.push_to_hub(recipe.push_to_hub))
    if onnx_dir is not None:
        HfApi().upload_folder(repo_id=recipe.push_to_hub, folder_path=str(onnx_dir), path_in_repo="onnx",
                              ignore_patterns=[MARKER], commit_message="Upload the ONNX export")
    return url
