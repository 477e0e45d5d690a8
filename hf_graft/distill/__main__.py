"""``python -m hf_graft.distill recipe.yaml``: run a recipe, on one process or under ``accelerate launch``.

    accelerate launch -m hf_graft.distill recipe.yaml [--out DIR]

is ``hf-graft run`` for several processes: the training stages run on all of them, the rest once
(see :mod:`hf_graft.recipes`).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_graft.distill", description="Run a distillation recipe (YAML).")
    parser.add_argument("recipe", help="the recipe file")
    parser.add_argument("--out", help="output directory (overrides the recipe's output_dir)")
    args = parser.parse_args(argv)
    from ..errors import HfGraftError
    from ..recipes import run_recipe

    try:
        run_recipe(args.recipe, output_dir=args.out)
    except HfGraftError as error:
        print(f"hf-graft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
