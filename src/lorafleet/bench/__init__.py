"""Benchmarks (not tests): each prints a table and writes its figures as JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from lorafleet.fsutil import atomic_write_json


def machine() -> str:
    """One line naming the machine, so figures in BENCHMARKS.md say where they were taken."""
    import torch  # here: the CLI reads benchmark configs (bench/soak_config.py) without torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def write_json(path: str | Path, figures: dict) -> Path:
    return atomic_write_json(path, {"machine": machine(), **figures})


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
