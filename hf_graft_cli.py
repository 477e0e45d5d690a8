"""``hf-graft``: the command line, one subcommand per Python entry point.

This module only defines the arguments, with nothing heavier than ``argparse``, so
``hf-graft --help`` answers at once; a subcommand's code (``hf_graft.cli`` and what it imports:
torch, transformers, peft) is imported when it runs.


    hf-graft demo [vision]                  the whole vision graft on embedded data, offline
    hf-graft vision train  --out DIR ...    donor -> graft with distillation -> report
    hf-graft vision eval   MODEL            accuracy and size of a saved graft
    hf-graft vision export MODEL --out DIR  ONNX (Optimum) + static int8, checked against PyTorch
    hf-graft skillpack extract|inspect|apply|export-lora|push   SkillPacks (see hf_graft.skillpack.cli)
    hf-graft layers specialise|graft|eval                        layer grafting (see hf_graft.layers.cli)
    hf-graft run RECIPE.yaml [--out DIR]    a whole job from one YAML file: distill, layer_graft or vision_graft (hf_graft.recipes)
"""

import argparse
import sys

#: dtypes the SkillPack commands load models in.
DTYPES = ("float32", "bfloat16", "float16")


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
    _skillpack_parser(sub)
    _layers_parser(sub)
    run = sub.add_parser("run", help="run a recipe (YAML): distillation to a SkillPack, a layer graft or a vision graft; evaluation, push")
    run.add_argument("recipe", help="a recipe file (YAML), e.g. hub_templates/recipes/addition-skill.yaml")
    run.add_argument("--out", help="output directory (overrides the recipe's output_dir)")
    return parser


def _skillpack_parser(sub) -> None:
    """Add ``skillpack`` and its subcommands to the top-level subparsers ``sub``."""
    skillpack = sub.add_parser("skillpack", help="SkillPacks: skills as compressed, bit-packed PEFT adapters")
    commands = skillpack.add_subparsers(dest="skillpack_command", required=True)

    extract = commands.add_parser("extract", help="compress tuned - base into a SkillPack")
    extract.add_argument("--base", required=True, help="base model folder or Hub id")
    extract.add_argument("--tuned", required=True, help="tuned model, or a LoRA adapter on the base (folder or Hub id)")
    extract.add_argument("--out", required=True, help="SkillPack folder to write")
    budget = extract.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=16.0, help="bf16 delta bytes / stored bytes (default 16)")
    budget.add_argument("--bytes", type=int, help="an absolute byte budget instead of --ratio")
    extract.add_argument(
        "--calibration",
        default="none",
        help="what the pack is measured and distilled on: 'none' (the default: data-free), a .safetensors file "
        "of samples (input_ids, and labels on the skill's answers), 'generate' (text the tuned model samples, "
        "weighed where it departs from the base; no tokenizer needed), 'pydoc' (embedded general text), "
        "a .txt file (paragraphs) or a Hub dataset id",
    )
    extract.add_argument("--calibration-samples", type=int, default=128, help="sequences used (default 128)")
    extract.add_argument("--distill-steps", type=int, help="scale distillation steps (default: none for checkpoints, each block would take that many; 200 end to end for a LoRA --tuned)")
    extract.add_argument("--calibration-length", type=int, default=256, help="tokens per sequence (default 256)")
    extract.add_argument("--calibration-column", default="text", help="text column of a Hub dataset")
    extract.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the models are loaded in (a LoRA --tuned)")
    extract.add_argument(
        "--tokenizer", help="tokenizer of the calibration text (folder or Hub id; default: the one saved beside --base)",
    )
    extract.add_argument("--device", default="auto", help="where compression runs: auto (the GPU when there is one), cpu, cuda[:N]")
    extract.add_argument("--push-to-hub", metavar="REPO_ID", help="push the pack when done")

    inspect = commands.add_parser("inspect", help="per module: kind, rank, bits, bytes, reconstruction error")
    inspect.add_argument("pack", help="SkillPack folder or Hub id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    apply = commands.add_parser("apply", help="merge a SkillPack into its base and save the merged model")
    apply.add_argument("pack", help="SkillPack folder or Hub id")
    apply.add_argument("--base", help="base model (default: the one the pack names)")
    apply.add_argument("--out", required=True, help="folder for the merged model (and the base's tokenizer)")
    apply.add_argument("--dtype", choices=DTYPES, help="dtype of the merged weights (default: the base's own)")
    apply.add_argument("--no-check-base", action="store_true", help="apply even if the base's fingerprint differs")
    apply.add_argument("--device", default="cpu",
                       help="where the low-rank products are computed: cpu (bit-exact with merge_and_unload), cuda[:N] or auto (faster)")

    export = commands.add_parser("export-lora", help="write the pack as a standard PEFT LoRA adapter")
    export.add_argument("pack", help="SkillPack folder or Hub id")
    export.add_argument("--out", required=True, help="folder for the LoRA adapter")
    export.add_argument("--base", help="base model whose architecture to read (default: the one the pack names)")
    export.add_argument("--sparse-rank", type=int, default=64,
                        help="largest rank for deltas that are not low rank (exact at their smaller side; default 64)")
    export.add_argument("--allow-lossy", action="store_true",
                        help="exit 0 even when a module is approximated with relative error above 0.1")
    export.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the LoRA factors")

    push = commands.add_parser("push", help="push a SkillPack folder to the Hub with its model card")
    push.add_argument("pack", help="SkillPack folder")
    push.add_argument("repo_id", help="Hub repo to create or update, e.g. org/skillpack-math")
    push.add_argument("--private", action="store_true", help="create the repo private")


def _layers_parser(sub) -> None:
    """Add ``layers`` and its subcommands to the top-level subparsers ``sub``."""
    group = sub.add_parser("layers", help="layer grafting: specialise a block, graft it between translators")
    commands = group.add_subparsers(dest="layers_command", required=True)

    specialise = commands.add_parser("specialise", help="LoRA on one block only, trained on modular addition, merged")
    specialise.add_argument("--model", required=True, help="causal LM folder or Hub id, with its tokenizer")
    specialise.add_argument("--layer", type=int, required=True, help="index of the block to specialise")
    specialise.add_argument("--out", required=True)
    specialise.add_argument("--modulus", type=int, default=4, help="n of 'a + b mod n' (default 4)")
    specialise.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    specialise.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    specialise.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")

    graft = commands.add_parser("graft", help="insert a donor block into a host and train its translators")
    graft.add_argument("--host", required=True, help="host causal LM folder or Hub id, with its tokenizer")
    graft.add_argument("--donor", required=True, help="the vanilla donor the block comes from")
    graft.add_argument("--donor-layer", type=int, required=True, help="index of the donor block to graft")
    graft.add_argument("--position", type=int, required=True, help="host block before which the graft goes")
    graft.add_argument("--tuned", help="the specialised donor (from 'layers specialise') whose block is swapped in")
    graft.add_argument("--strategy", choices=["original", "direct"], default="original",
                       help="original: translators around the vanilla block, then swap; direct: the tuned block throughout")
    graft.add_argument("--loss", choices=["residual", "residual_kl", "logits"], default="residual",
                       help="translator loss (default residual: MSE between the streams)")
    graft.add_argument("--data", choices=["task", "corpus", "mixed"], default="mixed", help="translator training text")
    graft.add_argument("--translator-init", choices=["identity", "least_squares"], default="identity",
                       help="identity, or least squares on paired activations (donors of another width)")
    graft.add_argument("--modulus", type=int, default=4, help="n of 'a + b mod n' (default 4)")
    graft.add_argument("--steps", type=int, default=300, help="translator training steps (default 300)")
    graft.add_argument("--gate", action="store_true", help="gate the graft per token, trained to open on the task and shut on pydoc text")
    graft.add_argument("--gate-steps", type=int, default=1000, help="gate training steps (default 1000)")
    graft.add_argument("--out", required=True, help="folder for the graft and its tokenizer")
    graft.add_argument("--push-to-hub", metavar="REPO_ID", help="push the graft (with its tokenizer) when done")

    evaluate = commands.add_parser("eval", help="format-hard, format-soft, factual, lexical perplexity, MLM predictability")
    evaluate.add_argument("model", help="a saved model or graft (folder or Hub id)")
    evaluate.add_argument("--tokenizer", help="where to read the tokenizer from (default: the model's folder)")
    evaluate.add_argument("--modulus", type=int, default=4, help="n of 'a + b mod n' (default 4)")
    evaluate.add_argument("--samples", type=int, default=200, help="task test prompts and text prompts (default 200)")
    evaluate.add_argument("--mlm", help="a masked LM for MLM predictability (e.g. bert-base-uncased)")
    evaluate.add_argument("--top-k", type=int, help="count only words the masked LM retrieves in its top k")


def main(argv=None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; the exit status."""
    args = build_parser().parse_args(argv)
    from hf_graft.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
