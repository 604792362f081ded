"""Held-out quads (A, A', B, B'): PSNR / SSIM of LoC against identity, copy and difference
baselines, for seen and unseen edits."""

from __future__ import annotations

import math

import numpy as np
import torch

from lorafleet.change.editor import Editor
from lorafleet.change.hyper import HyperNet
from lorafleet.change.photos import load_photos, random_crops
from lorafleet.change.sampling import eval_edits

BASELINES = ("G alone", "identity", "copy", "difference")


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = float((x.clamp(0, 1) - y).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    from skimage.metrics import structural_similarity

    a = x.clamp(0, 1).numpy().astype(np.float64)
    b = y.clamp(0, 1).numpy().astype(np.float64)
    return float(structural_similarity(a, b, channel_axis=0, data_range=1.0, win_size=7))


def _textured(photos, size: int, g: torch.Generator, min_std: float = 0.06) -> torch.Tensor:
    """A crop [1, 3, size, size] with some texture (flat sky shows no edit); 20 tries at most."""
    for _ in range(20):
        crop = random_crops(photos, 1, size, g)
        if float(crop.std()) >= min_std:
            break
    return crop


def quads(seed: int, per_edit: int, size: int) -> list[dict]:
    """`per_edit` quads for each evaluated edit, on crops of the held-out photos."""
    g = torch.Generator().manual_seed(10_000 + seed)
    photos = load_photos("heldout")
    out = []
    for _ in range(per_edit):
        for group, edit in eval_edits(g):
            a, b = _textured(photos, size, g), _textured(photos, size, g)
            out.append(
                {
                    "group": group,
                    "edit": edit.name,
                    "label": edit.label(),
                    "a": a,
                    "a2": edit(a),
                    "b": b,
                    "b2": edit(b),
                }
            )
    return out


@torch.no_grad()
def loc_edit(editor: Editor, hyper: HyperNet, a, a2, b) -> torch.Tensor:
    """B' = G(H(A, A'), B), clamped to [0, 1]."""
    return editor(b, hyper(a, a2)).clamp(0, 1)


def predictions(q: dict, models: dict[str, tuple[Editor, HyperNet]]) -> dict[str, torch.Tensor]:
    """Every method's B' for one quad: the LoC models by label, then the baselines."""
    out = {name: loc_edit(e, h, q["a"], q["a2"], q["b"]) for name, (e, h) in models.items()}
    editor = next(iter(models.values()))[0]
    with torch.no_grad():
        out["G alone"] = editor(q["b"]).clamp(0, 1)  # the frozen editor's own floor, no LoRA
    out["identity"] = q["b"]
    out["copy"] = q["a2"]
    out["difference"] = (q["b"] + q["a2"] - q["a"]).clamp(0, 1)
    return out


def evaluate(models: dict[str, tuple[Editor, HyperNet]], qs: list[dict], progress=None) -> dict:
    """{"groups": {group: {method: {psnr, ssim}}}, "edits": {group/edit: {method: psnr}}}."""
    sums: dict = {}
    for i, q in enumerate(qs):
        for method, pred in predictions(q, models).items():
            target = q["b2"][0]
            for key in (q["group"], f"{q['group']}/{q['edit']}"):
                cell = sums.setdefault(key, {}).setdefault(method, [0.0, 0.0, 0])
                cell[0] += psnr(pred[0], target)
                cell[1] += ssim(pred[0], target)
                cell[2] += 1
        if progress is not None:
            progress(i + 1, len(qs))
    table = {
        k: {m: {"psnr": round(p / n, 2), "ssim": round(s / n, 3)} for m, (p, s, n) in v.items()}
        for k, v in sums.items()
    }
    return {
        "groups": {k: v for k, v in table.items() if "/" not in k},
        "edits": {k: v for k, v in table.items() if "/" in k},
    }
