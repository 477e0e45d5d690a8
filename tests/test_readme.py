"""Every Python block of the README runs as written, offline, in a fresh process.

A block whose first line starts with ``# continues`` runs after the blocks it continues, in the
same process; every other block starts a new one. All run in one working folder, in README order,
so a block may use the files an earlier one saved. Blocks that need the export extra are left out
where optimum is not installed.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_programs() -> list:
    """The README's Python blocks grouped into programs: ``[[block, ...], ...]`` in order."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    programs = []
    for block in blocks:
        if block.lstrip().startswith("# continues") and programs:
            programs[-1].append(block)
        else:
            programs.append([block])
    return programs


def needs_export_extra(block: str) -> bool:
    return "hf_graft.vision.export" in block


def test_the_readme_has_its_examples():
    programs = readme_programs()
    assert len(programs) >= 5 and sum(len(p) for p in programs) >= 8
    assert all(not block.lstrip().startswith("# continues") for block in (p[0] for p in programs))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_programs())))
def test_readme_program_runs(index, workdir):
    blocks = readme_programs()[index]
    if importlib.util.find_spec("optimum") is None:
        blocks = [block for block in blocks if not needs_export_extra(block)]
    code = "\n".join(blocks)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README program {index} failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"
