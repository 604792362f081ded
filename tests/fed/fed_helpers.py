"""Shared helpers for the federated tests: a small labelled data set and CLI arguments."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "1": ["great", "lovely", "superb", "moving", "fresh", "clever"],
    "0": ["awful", "dull", "tedious", "weak", "stale", "clumsy"],
}
GENRES = ("drama", "comedy", "horror")


def write_reviews(path: Path, n: int, seed: int = 0) -> Path:
    """Labelled rows {"text", "label", "genre"}: a sentiment task the tiny model can fit."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = str(i % 2)
        text = f"a {rng.choice(WORDS[label])} and {rng.choice(WORDS[label])} film"
        rows.append({"text": text, "label": label, "genre": GENRES[(i // 2) % 3]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fed_options(base: Path, train: Path, val: Path, out: Path, **overrides) -> list[str]:
    """`lorafleet fed simulate|server` options for a quick run on the tiny model."""
    options = {
        "--base": base,
        "--data": train,
        "--val": val,
        "--out": out,
        "--clients": 2,
        "--rounds": 2,
        "--local-steps": 2,
        "--batch-size": 4,
        "--rank": 4,
        "--alpha": 8,
        "--lr": 5e-3,
        "--max-length": 64,
        "--eval-limit": 8,
    }
    options.update({f"--{k.replace('_', '-')}": v for k, v in overrides.items()})
    args: list[str] = []
    for key, value in options.items():
        args += [key, str(value)]
    return [*args, "--no-chat"]
