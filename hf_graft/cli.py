"""``hf-graft``: the command line, one subcommand per Python entry point.

    hf-graft demo [vision]                  the whole vision graft on embedded data, offline
    hf-graft vision train  --out DIR ...    donor -> graft with distillation -> report
    hf-graft vision eval   MODEL            accuracy and size of a saved graft
    hf-graft vision export MODEL --out DIR  ONNX (Optimum) + static int8, checked against PyTorch
    hf-graft skillpack extract|inspect|apply|export-lora|push   SkillPacks (see hf_graft.skillpack.cli)
    hf-graft layers specialise|graft|eval                        layer grafting (see hf_graft.layers.cli)
    hf-graft run RECIPE.yaml [--out DIR]    distil teacher -> target, extract the SkillPack (hf_graft.recipes)
"""

import argparse
import json
import os
import sys

from .errors import is_network_error
from .layers import cli as layers_cli
from .skillpack import cli as skillpack_cli


def _add_training_flags(parser, prefix: str, epochs: int, lr: float):
    parser.add_argument(f"--{prefix}-epochs", type=int, default=epochs, help=f"{prefix} training epochs")
    parser.add_argument(f"--{prefix}-lr", type=float, default=lr, help=f"{prefix} learning rate (AdamW, cosine)")


def _vision_parser(sub):
    vision = sub.add_parser("vision", help="feature-scion grafting for image classification")
    commands = vision.add_subparsers(dest="vision_command", required=True)

    train = commands.add_parser("train", help="train the donor, graft its scion, train the graft with distillation")
    train.add_argument("--out", required=True, help="output directory (donor/, grafted/, report.md)")
    train.add_argument("--preset", default="paper", help="architecture preset (paper, paper-mobilenetv2, rootstock-only)")
    train.add_argument("--dataset", default="digits", help="'digits' (embedded), an image folder, or a Hub dataset id")
    train.add_argument("--image-column", help="image column of a Hub dataset (default: found by type)")
    train.add_argument("--label-column", help="label column of a Hub dataset (default: found by type)")
    train.add_argument("--image-size", type=int, help="override the preset's input size")
    train.add_argument("--donor-name", help="timm name of the donor CNN")
    train.add_argument("--scion-cut", help="donor layer after which the scion is cut (e.g. features.13)")
    train.add_argument("--freeze-scion", action="store_true", help="keep the scion's donor weights fixed")
    train.add_argument("--rootstock", help="timm name of a rootstock backbone concatenated with the scion")
    train.add_argument("--donor", help="a donor checkpoint directory to graft from instead of training one")
    train.add_argument("--donor-pretrained", action="store_true", help="start the donor from timm's pretrained weights")
    _add_training_flags(train, "donor", 3, 1e-4)
    _add_training_flags(train, "graft", 3, 1e-3)
    train.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    train.add_argument("--distill-weight", type=float, default=0.5, help="weight of the donor's soft targets (default 0.5)")
    train.add_argument("--distill-temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    train.add_argument("--seed", type=int, default=0, help="seed of the splits and training (default 0)")
    train.add_argument("--push-to-hub", metavar="REPO_ID", help="push the graft to this Hub repo when done")

    evaluate = commands.add_parser("eval", help="evaluate a saved graft (directory or Hub repo)")
    evaluate.add_argument("model", help="a saved graft (folder or Hub id)")
    evaluate.add_argument("--dataset", default="digits", help="'digits' (embedded), an image folder, or a Hub dataset id")
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test", help="split to score (default test)")

    export = commands.add_parser("export", help="export to ONNX with Optimum and quantise to static int8")
    export.add_argument("model", help="a saved graft (folder or Hub id)")
    export.add_argument("--out", required=True, help="folder for model.onnx and model_int8.onnx")
    export.add_argument("--dataset", default="digits", help="calibration and agreement images")
    export.add_argument("--calibration-samples", type=int, default=256, help="images to calibrate int8 on (default 256)")
    export.add_argument("--opset", type=int, help="ONNX opset (default: Optimum's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-graft", description="Knowledge grafting on the Hugging Face Hub.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a whole graft offline on embedded data")
    demo.add_argument("kind", nargs="?", default="vision", choices=["vision"])
    demo.add_argument("--out", default="hf-graft-demo", help="output directory")
    _vision_parser(sub)
    skillpack_cli.add_parser(sub)
    layers_cli.add_parser(sub)
    run = sub.add_parser("run", help="run a recipe (YAML): distillation to a SkillPack, or a layer graft; evaluation, push")
    run.add_argument("recipe", help="a recipe file (YAML), e.g. hub_templates/recipes/addition-skill.yaml")
    run.add_argument("--out", help="output directory (overrides the recipe's output_dir)")
    return parser


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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_vision_demo

            run_vision_demo(args.out)
        elif args.command == "skillpack":
            skillpack_cli.run(args)
        elif args.command == "layers":
            layers_cli.run(args)
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


if __name__ == "__main__":
    sys.exit(main())
