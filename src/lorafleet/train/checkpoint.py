"""Checkpoints: adapter + optimizer + scheduler + RNG + step, written so a crash never corrupts one.

Layout: OUT/checkpoints/step-0000120/{adapter_config.json, adapter_model.safetensors, state.pt}
and OUT/checkpoints/latest (the name of the newest complete one). A checkpoint is built in a
temp dir and renamed into place, then `latest` is replaced atomically: a SIGKILL at any moment
leaves the previous checkpoint intact and at worst an ignored temp dir.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from lorafleet.adapters import Adapter, read_adapter, write_adapter
from lorafleet.errors import LorafleetError

STATE = "state.pt"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out: Path, step: int, adapter: Adapter, state: dict, keep: int) -> Path:
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write_adapter(tmp, adapter)
        torch.save({**state, "step": step}, tmp / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return (path / STATE).is_file() and (path / "adapter_config.json").is_file()


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint, or None. Leftover temp dirs are ignored."""
    root = checkpoints_dir(out)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _complete(named):
            return named
    done = [p for p in sorted(root.glob("step-*")) if _complete(p)]
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[Adapter, dict]:
    """The adapter and the trainer state; the state is read with weights_only=True (no pickle
    code runs), so only tensors and plain containers come back."""
    adapter = read_adapter(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable state is the same problem to the user
        raise LorafleetError(f"{path / STATE}: unreadable checkpoint state ({exc})") from exc
    return adapter, state
