"""Package attributes imported on first use, so ``import hf_graft`` pays only for what it registers."""

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to its submodule.

    A name that maps to itself is a submodule (``"metrics": "metrics"``); any other name is an
    attribute of the submodule it maps to (``"fuse": "skillpack.fusion"``). The value is imported on
    first access and cached in the package, as transformers' ``_LazyModule`` does.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        value = module if exports[name] == name else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
