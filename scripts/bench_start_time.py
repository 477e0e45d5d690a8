"""How fast hf-graft starts: ``hf-graft --help`` and ``import hf_graft`` against ``import transformers, peft``.

Each command runs ``--runs`` times in a fresh interpreter; the median wall time is reported, with
the ratio of ``import hf_graft`` to the transformers + peft import it cannot avoid (it registers
its models with both). Writes ``start_time.json`` and ``start_time.md`` to ``--out``.

    python scripts/bench_start_time.py            # about a minute
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from hf_graft.reporting import markdown_table, write_results

COMMANDS = {
    "hf-graft --help": [shutil.which("hf-graft") or "hf-graft", "--help"],
    "import hf_graft": [sys.executable, "-c", "import hf_graft"],
    "import transformers, peft": [sys.executable, "-c", "import transformers, peft"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def median_seconds(command: list, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="bench_results/start_time")
    args = parser.parse_args()
    seconds = {name: median_seconds(command, args.runs) for name, command in COMMANDS.items()}
    ratio = seconds["import hf_graft"] / seconds["import transformers, peft"]
    rows = [{"command": name, "median_s": round(value, 3)} for name, value in seconds.items()]
    table = markdown_table(rows)
    summary = (
        f"`hf-graft --help`: {seconds['hf-graft --help']:.2f} s (target < 1 s); `import hf_graft` is "
        f"{ratio:.2f}x `import transformers, peft` (target <= 1.5x)."
    )
    write_results(args.out, "start_time", {"seconds": seconds, "import_ratio": ratio, "runs": args.runs},
                  f"# hf-graft start time ({args.runs} runs each, median)\n\n{table}\n\n{summary}\n")
    print(table)
    print(summary)


if __name__ == "__main__":
    main()
