"""The model directory: config.json, editor.safetensors, hyper.safetensors (+ checkpoint/)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafleet.change.config import ChangeConfig
from lorafleet.change.editor import Editor
from lorafleet.change.hyper import HyperNet
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write, atomic_write_json

__all__ = ["ChangeConfig", "build", "load_model", "load_weights", "save_model", "save_weights"]


def build(cfg: ChangeConfig) -> tuple[Editor, HyperNet]:
    """A fresh editor and hypernetwork (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    editor = Editor(cfg.width, residual=cfg.editor == "residual")
    hyper = HyperNet(editor.layer_shapes(), cfg.rank, cfg.dim, cfg.image_size, cfg.depth)
    return editor, hyper


def save_weights(path: Path, module: torch.nn.Module) -> None:
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_weights(path: Path, module: torch.nn.Module) -> None:
    module.load_state_dict(load_file(str(path)))


def save_model(folder: Path, cfg: ChangeConfig, editor: Editor, hyper: HyperNet) -> Path:
    """Write the editor and hypernetwork (config last, so a half-written dir has none)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "editor.safetensors", editor)
    save_weights(folder / "hyper.safetensors", hyper)
    atomic_write_json(folder / "config.json", asdict(cfg))
    return folder


def load_model(folder: str | Path) -> tuple[ChangeConfig, Editor, HyperNet]:
    """(config, editor, hypernetwork) of a `lorafleet change train` output directory."""
    folder = Path(folder)
    file = folder / "config.json"
    if not file.is_file():
        raise LorafleetError(f"{file}: missing (not a `lorafleet change train` directory)")
    try:
        cfg = ChangeConfig.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError, LorafleetError) as exc:
        raise LorafleetError(f"{file}: not a valid LoC config ({exc})") from exc
    editor, hyper = build(cfg)
    try:
        load_weights(folder / "editor.safetensors", editor)
        load_weights(folder / "hyper.safetensors", hyper)
    except (OSError, RuntimeError) as exc:
        raise LorafleetError(f"{folder}: cannot load the LoC weights ({exc})") from exc
    editor.eval().requires_grad_(False)
    hyper.eval().requires_grad_(False)
    return cfg, editor, hyper
