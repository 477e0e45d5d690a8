"""What the ``hf-graft`` subcommands do, once ``hf_graft_cli`` (which lists them) has parsed their arguments.

The vision commands live here; ``hf_graft.skillpack.cli`` and ``hf_graft.layers.cli`` hold theirs,
``hf_graft.recipes`` runs ``hf-graft run`` and ``hf_graft.demo`` the demo.
"""

import json
import os
import sys

from .errors import is_network_error


def _vision_train(args):
    from .models.configuration_grafted_vision import GraftedVisionConfig
    from .vision import TrainingArguments, graft_vision, load_image_splits
    from .reporting import markdown_table
    from .vision.pipeline import REPORT_COLUMNS

    overrides = {
        k: v
        for k, v in {
            "image_size": args.image_size,
            "donor_name": args.donor_name,
            "scion_cut": args.scion_cut,
            "rootstock": args.rootstock,
        }.items()
        if v is not None
    }
    if args.freeze_scion:
        overrides["scion_trainable"] = False
    config = GraftedVisionConfig.from_preset(args.preset, **overrides)
    splits = load_image_splits(args.dataset, config, image_column=args.image_column, label_column=args.label_column)
    config = GraftedVisionConfig.from_preset(args.preset, **overrides, num_labels=len(splits.label_names))
    common = dict(output_dir="", batch_size=args.batch_size, seed=args.seed)
    result = graft_vision(
        config,
        args.out,
        dataset=splits,
        donor_checkpoint=args.donor,
        donor_pretrained=args.donor_pretrained,
        donor_args=TrainingArguments(epochs=args.donor_epochs, learning_rate=args.donor_lr, distill_weight=0.0, **common),
        graft_args=TrainingArguments(
            epochs=args.graft_epochs,
            learning_rate=args.graft_lr,
            distill_weight=args.distill_weight,
            distill_temperature=args.distill_temperature,
            **common,
        ),
    )
    print(markdown_table(result.rows, REPORT_COLUMNS))
    if args.push_to_hub:
        url = result.grafted.push_to_hub(args.push_to_hub)
        print(f"pushed: {url}")


def _load_graft(reference: str):
    import hf_graft  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageClassification

    from .references import checked_reference

    return AutoModelForImageClassification.from_pretrained(checked_reference(reference, "vision graft"))


def _vision_eval(args):
    from . import metrics
    from .vision import evaluate_classifier, load_image_splits

    model = _load_graft(args.model)
    splits = load_image_splits(args.dataset, model.config)
    scores = evaluate_classifier(model, getattr(splits, args.split))
    size = metrics.footprint(model)
    print(json.dumps({"split": args.split, **scores, "params": size["parameters"], "fp32_mb": size["megabytes"]}, indent=2))


def _vision_export(args):
    from .vision import load_image_splits, stack_images
    from .vision.export import compare_onnx, export_onnx, quantize_int8

    model = _load_graft(args.model).eval()
    splits = load_image_splits(args.dataset, model.config)
    calibration, _ = stack_images(splits.train, args.calibration_samples)
    images, labels = stack_images(splits.test)
    report = {"fp32": export_onnx(model, args.out, opset=args.opset, validation_images=images[:32])}
    int8_path = os.path.join(args.out, "model_int8.onnx")
    report["int8"] = quantize_int8(report["fp32"]["path"], calibration, int8_path)
    report["comparison"] = compare_onnx(report["fp32"]["path"], int8_path, images, labels)
    print(json.dumps(report, indent=2, default=str))


def run(args) -> int:
    """Run the subcommand ``hf_graft_cli`` parsed; the exit status (2: a user error, said in one line)."""
    try:
        if args.command == "demo":
            from .demo import run_vision_demo

            run_vision_demo(args.out)
        elif args.command == "skillpack":
            from .skillpack.cli import run as run_skillpack

            run_skillpack(args)
        elif args.command == "layers":
            from .layers.cli import run as run_layers

            run_layers(args)
        elif args.command == "run":
            from .recipes import run_recipe

            run_recipe(args.recipe, output_dir=args.out)
        elif args.vision_command == "train":
            _vision_train(args)
        elif args.vision_command == "eval":
            _vision_eval(args)
        elif args.vision_command == "export":
            _vision_export(args)
    except ValueError as error:  # HfGraftError and the model configs' own checks: user errors
        print(f"hf-graft: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not is_network_error(error):
            raise
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        print(
            f"hf-graft: error: the Hub at {endpoint} cannot be reached ({type(error).__name__}). Check the "
            "network, or set HF_ENDPOINT to a reachable Hub (HF_HUB_OFFLINE=1 to use only cached files).",
            file=sys.stderr,
        )
        return 2
    return 0
