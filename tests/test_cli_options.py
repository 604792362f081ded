"""Every command's options (names, defaults, help, bounds) match tests/cli_options_snapshot.json,
and every command's --help shows examples.

Users depend on option names, defaults and help text, so a change to them must be deliberate.
After such a change, regenerate the snapshot and review its diff:

    .venv/bin/python tests/test_cli_options.py --write
    git diff tests/cli_options_snapshot.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("cli_options_snapshot.json")


def _plain(value):
    """A JSON-friendly form of a default (Paths as strings, tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _type_name(param) -> str:
    descriptor = getattr(param, "type_descriptor", None)  # Typer's own click (Typer >= 0.22)
    kind = descriptor.annotation if descriptor is not None else param.type.name
    return str(kind).removeprefix("<class '").removesuffix("'>")


def _describe(param) -> dict:
    row = {
        "opts": list(param.opts),
        "secondary_opts": list(param.secondary_opts),
        "default": _plain(param.default),
        "required": param.required,
        "type": _type_name(param),
        "multiple": param.multiple,
        "is_flag": bool(getattr(param, "is_flag", False)),
        "help": getattr(param, "help", None),
    }
    for bound in ("min", "max"):  # on the option (Typer >= 0.22) or on its click type
        value = getattr(param, bound, getattr(getattr(param, "type", None), bound, None))
        if value is not None:
            row[bound] = value
    return row


def _walk(command, path: str, out: dict) -> None:
    out[path] = {p.name: _describe(p) for p in command.params if p.param_type_name == "option"}
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        _walk(sub, f"{path} {name}", out)


def current_options() -> dict:
    """{"lorafleet fed simulate": {param: {opts, default, required, help, ...}}, ...}."""
    import typer

    from lorafleet.cli import app

    out: dict = {}
    _walk(typer.main.get_command(app), "lorafleet", out)
    return out


def _leaves() -> list[str]:
    """Every runnable command path (groups left out), e.g. "lorafleet fed simulate"."""
    import typer

    from lorafleet.cli import app

    stack, leaves = [("lorafleet", typer.main.get_command(app))], []
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", {})
        leaves += [] if subs else [path]
        stack += [(f"{path} {name}", sub) for name, sub in subs.items()]
    return sorted(leaves)


def test_options_match_the_snapshot():
    expected = json.loads(SNAPSHOT.read_text())
    current = json.loads(json.dumps(current_options()))
    # New commands may appear (add them to the snapshot deliberately); none may vanish.
    missing = sorted(set(expected) - set(current))
    assert not missing, f"commands gone: {missing}"
    for path, options in expected.items():
        assert current[path] == options, f"{path}: options changed (see this file's docstring)"


def test_snapshot_covers_every_command():
    unknown = sorted(set(current_options()) - set(json.loads(SNAPSHOT.read_text())))
    assert not unknown, f"not in the snapshot (regenerate it, see the docstring): {unknown}"


@pytest.mark.parametrize("path", _leaves())
def test_every_command_help_shows_examples(run_cli, path):
    code, out, _ = run_cli(*path.split()[1:], "--help")
    assert code == 0 and "Example" in out and "lorafleet" in out.split("Example", 1)[1], path


if __name__ == "__main__":  # regenerate the snapshot deliberately (see the docstring)
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_cli_options.py --write")
    SNAPSHOT.write_text(json.dumps(current_options(), indent=2) + "\n")
    print(f"wrote {SNAPSHOT}")
