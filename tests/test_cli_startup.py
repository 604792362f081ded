"""`lorafleet` starts light: importing the CLI (every command registered, every option's default
read from its config type), `--help` of every command and a usage error import none of torch,
PEFT, transformers, FastAPI or Flower, so they answer at once. Each check runs in a fresh
interpreter: this test process has imported them all already."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "peft", "transformers", "fastapi", "flwr")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_cli_imports_no_heavy_library():
    proc = python(
        "import lorafleet.cli, sys; "
        f"heavy = set({HEAVY!r}) & set(sys.modules); assert not heavy, sorted(heavy)"
    )
    assert proc.returncode == 0, proc.stderr


def test_the_check_sees_a_heavy_import():
    # The same check fails once something imports a heavy library (so it can fail at all).
    proc = python(
        "import lorafleet.cli, lorafleet.train.loop, sys; "
        f"heavy = set({HEAVY!r}) & set(sys.modules); assert not heavy, sorted(heavy)"
    )
    assert proc.returncode == 1 and "torch" in proc.stderr


def test_help_runs_and_lists_the_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "serve" in proc.stdout


# Runs `--help` of every command and group, then a usage error, in one interpreter, and prints
# the exit codes and the heavy libraries imported by then.
EVERY_HELP = """
import json, sys
import typer
from lorafleet.cli import app, main

def paths(command, prefix=()):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from paths(sub, (*prefix, name))

root = typer.main.get_command(app)
codes = {" ".join(p) or "lorafleet": main([*p, "--help"]) for p in paths(root)}
codes["train --rank x"] = main(["train", "-b", "b", "-d", "d", "-o", "o", "--rank", "x"])
print(json.dumps({"codes": codes, "heavy": sorted(set(HEAVY) & set(sys.modules))}))
"""


def test_every_help_and_a_usage_error_import_no_heavy_library():
    proc = python(f"HEAVY = {HEAVY!r}\n" + EVERY_HELP)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = found["codes"]
    assert {"train", "serve", "calibrate", "fed simulate", "bench engine"} <= set(codes)
    assert codes.pop("train --rank x") == 2
    assert set(codes.values()) == {0}, codes
    assert found["heavy"] == []
