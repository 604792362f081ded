"""Where lorafleet keeps its cache and finds the shared data sets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache dir: `$LORAFLEET_CACHE`, else `~/.cache/lorafleet`."""
    env = os.environ.get("LORAFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorafleet"


def data_dir() -> Path | None:
    """The real data sets: `$LORAFLEET_DATA`, else `../shared/data` beside the checkout."""
    env = os.environ.get("LORAFLEET_DATA")
    if env:
        return Path(env).expanduser()
    # src/lorafleet/paths.py -> checkout root is parents[2]; shared/ sits beside the checkout.
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
    return candidate if candidate.is_dir() else None
