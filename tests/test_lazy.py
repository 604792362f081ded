"""Lazy package exports (lorafleet.lazy): every exported name resolves to what its submodule
defines, `dir()` lists it, an unknown name is an AttributeError, and an exported function keeps
its name when the same-named submodule is imported first (as an eager import did)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

LAZY_PACKAGES = [
    "adapters",
    "bayes",
    "compose",
    "data",
    "eval",
    "fed",
    "layers",
    "models",
    "serve",
    "serve.api",
    "train",
    "transfer",
]


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_every_export_resolves_and_is_listed(name):
    package = importlib.import_module(f"lorafleet.{name}")
    assert package.__all__, name
    for export in package.__all__:
        value = getattr(package, export)
        assert not isinstance(value, type(sys)), f"lorafleet.{name}.{export} is a module"
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # noqa: B018


def test_an_export_wins_over_its_same_named_submodule():
    # Fresh interpreters: the submodule (eval.evaluate, fed.aggregate) is imported before the
    # package's export of the same name is first used.
    for package, name in (("eval", "evaluate"), ("fed", "aggregate"), ("bayes", "posterior")):
        code = (
            f"import lorafleet.{package}.{name}, types\n"
            f"from lorafleet.{package} import {name}\n"
            f"assert not isinstance({name}, types.ModuleType), {name}\n"
            f"assert callable({name})"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (package, name, proc.stderr)


def test_aliased_and_absolute_exports():
    from lorafleet.layers import check_quantize
    from lorafleet.layers.quant import check_mode
    from lorafleet.linear_layers import target_names
    from lorafleet.models import target_names as exported

    assert check_quantize is check_mode and exported is target_names
