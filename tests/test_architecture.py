"""The package's import graph, read with ``ast``: no circles, no private names across modules, and the
method packages independent of each other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_graft"
METHODS = ("hf_graft.vision", "hf_graft.layers", "hf_graft.skillpack")


def _modules() -> dict:
    """Dotted module name -> (path, is a package)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(module: str) -> list:
    """``(imported module, name or None, line)`` for every import of hf_graft code in ``module``,
    those inside functions too (a circle broken only by a deferred import is still a circle)."""
    path, is_package = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("hf_graft")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (module if is_package else module.rsplit(".", 1)[0]).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_graft"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in MODULES else (target, alias.name, node.lineno))
    return found


def _edges() -> dict:
    return {module: {target for target, _, _ in _imports(module) if target in MODULES and target != module} for module in MODULES}


def _circles(edges: dict) -> list:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return circles


def _package_circles(edges: dict) -> dict:
    """Edges between modules, with each package's ``__init__`` edges to its own modules dropped:
    a package importing its modules to re-export them is not a circle."""
    return {module: {t for t in targets if not (MODULES[module][1] and t.startswith(module + "."))} for module, targets in edges.items()}


def test_the_walk_sees_the_package():
    edges = _edges()
    assert "hf_graft.skillpack.compression.formats" in edges["hf_graft.skillpack.files"]
    assert "hf_graft.recipes.common" in edges["hf_graft.recipes.layer_graft"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _circles(_package_circles(_edges())) == []


def test_no_private_names_imported_across_modules():
    private = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, name, line in _imports(module)
        if name is not None and name.startswith("_") and target != module
    ]
    assert private == []


@pytest.mark.parametrize("method", METHODS)
def test_method_packages_import_none_of_each_other(method):
    others = [other for other in METHODS if other != method]
    crossing = [
        f"{module} imports {target}"
        for module, targets in _edges().items()
        if module == method or module.startswith(method + ".")
        for target in targets
        if any(target == other or target.startswith(other + ".") for other in others)
    ]
    assert crossing == []


def test_hub_cards_take_data():
    assert not [target for target in _edges()["hf_graft.hub"] if target.startswith(METHODS)]


def test_shipped_model_code_imports_only_its_own_folder():
    for module in MODULES:
        if module.startswith("hf_graft.models."):
            assert all(target.startswith("hf_graft.models") for target in _edges()[module]), module


def test_the_package_never_imports_the_command_line_module():
    """``hf_graft_cli`` lists the commands and imports ``hf_graft.cli`` to run them; nothing imports it back."""
    importers = sorted(module for module in MODULES if any(target == "hf_graft_cli" for target, _, _ in _imports(module)))
    assert importers == []


def test_compression_never_reaches_back_into_extraction():
    """Extraction drives the compression steps; the steps know nothing of where deltas come from."""
    crossing = [
        f"{module} imports {target}"
        for module, targets in _edges().items()
        if module.startswith("hf_graft.skillpack.compression")
        for target in targets
        if target.startswith("hf_graft.skillpack.extraction")
    ]
    assert crossing == []
