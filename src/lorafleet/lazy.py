"""Lazy package exports (PEP 562): a package's `__init__` names what it exports and the submodule
each name lives in, and a submodule is imported on the first use of one of its names, so that
importing a package (the CLI imports only config types) does not import torch and friends."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for the package named `package`, which exports
    each name of `where` from the module it maps to: relative to the package (`".config"`) or
    absolute (`"lorafleet.linear_layers"`), optionally with the name it has there
    (`".quant:check_mode"`). A name is imported on its first use and then kept on the package.
    Use it once, last, in the package's `__init__.py`:

        __getattr__, __dir__, __all__ = lazy_exports(__name__, {"EvalConfig": ".config"})
    """
    table = {name: tuple(spec.partition(":")[::2]) for name, spec in where.items()}

    def load(name: str) -> Any:
        module, attr = table[name]
        return getattr(importlib.import_module(module, package), attr or name)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = load(name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table})

    class LazyPackage(types.ModuleType):
        """The package module. When a submodule is first imported, the import system binds it
        on its package under its own name; where the package exports that name from a
        submodule (`lorafleet.eval.evaluate`, the function of the module `evaluate`), the
        binding is dropped so that the name still gives the export (loaded on use), as an
        eager `from .evaluate import evaluate` in `__init__` did."""

        def __setattr__(self, name: str, value: Any) -> None:
            if (
                name in table
                and isinstance(value, types.ModuleType)
                and value.__name__ == f"{package}.{name}"
            ):
                return
            super().__setattr__(name, value)

    sys.modules[package].__class__ = LazyPackage
    return __getattr__, __dir__, list(table)
