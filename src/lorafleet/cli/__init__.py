"""The `lorafleet` command line: thin Typer commands over the library (no logic here)."""

from __future__ import annotations

# The command modules register themselves on `app` when imported.
from lorafleet.cli import (  # noqa: E402, F401
    bayes_cmds,
    bench_cmds,
    change_cmds,
    compose_cmds,
    demo_cmds,
    fed_cmds,
    model_cmds,
    mole_cmds,
    precision_cmds,
    serve_cmds,
    train_cmds,
    transfer_cmds,
)
from lorafleet.cli.app import USAGE_ERRORS, app, main

__all__ = ["USAGE_ERRORS", "app", "main"]
