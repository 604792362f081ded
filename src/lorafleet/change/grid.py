"""A picture grid a person can judge: rows are edits, columns A, A', B, true B', the methods."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lorafleet.fsutil import atomic_write

PNG_MODE = 0o644  # mkstemp alone would leave 0600


def png_writer(save):
    """`save(tmp)`, then the usual file permissions."""

    def write(tmp: str) -> None:
        save(tmp)
        os.chmod(tmp, PNG_MODE)

    return write


def _tile(x: torch.Tensor, scale: int) -> np.ndarray:
    img = (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return img.repeat(scale, 0).repeat(scale, 1)


def save_grid(path: Path, rows: list[dict], columns: list[str], scale: int = 3) -> Path:
    """rows: {"label": str, column: image [1, 3, H, W]}; a header row names the columns."""
    from PIL import Image, ImageDraw

    size = rows[0][columns[0]].shape[-1] * scale
    pad, left, top = 4, 210, 18
    width = left + len(columns) * (size + pad)
    height = top + len(rows) * (size + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((left + j * (size + pad), 3), name, fill="black")
    for i, row in enumerate(rows):
        y = top + i * (size + pad)
        draw.text((4, y + size // 2 - 6), row["label"][:34], fill="black")
        for j, name in enumerate(columns):
            canvas.paste(Image.fromarray(_tile(row[name], scale)), (left + j * (size + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, png_writer(lambda tmp: canvas.save(tmp, format="PNG")))
    return path
