"""Held-out quads (A, A', B, B') on held-out photos: PSNR / SSIM of LoC against the identity,
"G alone", copy and difference baselines, per edit family and condition (seen edits, held-out
edit types, held-out parameter ranges), with paired bootstrap intervals and per-seed means."""

from __future__ import annotations

import math

import numpy as np
import torch

from lorafleet.change.editor import Editor
from lorafleet.change.edits import EXPRESSIBLE, FAMILIES
from lorafleet.change.hyper import HyperNet
from lorafleet.change.photos import load_photos, random_crops
from lorafleet.change.sampling import CONDITIONS, eval_edits

BASELINES = ("G alone", "identity", "copy", "difference")
BOOTSTRAP = 2000  # resamples of the quads for each interval

Models = dict[str, list[tuple[Editor, HyperNet]]]  # label -> one (G, H) per training seed


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
    """`per_edit` quads for each evaluated edit type and condition, on crops of the held-out
    photos (A and B cut independently, so usually from different places or photos)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    photos = load_photos("heldout")
    out = []
    for _ in range(per_edit):
        for fam, condition, edit in eval_edits(g):
            a, b = _textured(photos, size, g), _textured(photos, size, g)
            out.append(
                {
                    "family": fam,
                    "condition": condition,
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


def predictions(q: dict, models: Models) -> dict[str, list[torch.Tensor]]:
    """Every method's B' for one quad, one per seed: the LoC models by label, then the
    baselines ("G alone": the first label's frozen editors without a LoRA)."""
    out = {
        name: [loc_edit(e, h, q["a"], q["a2"], q["b"]) for e, h in runs]
        for name, runs in models.items()
    }
    with torch.no_grad():
        out["G alone"] = [e(q["b"]).clamp(0, 1) for e, _ in next(iter(models.values()))]
    out["identity"] = [q["b"]]
    out["copy"] = [q["a2"]]
    out["difference"] = [(q["b"] + q["a2"] - q["a"]).clamp(0, 1)]
    return out


def bootstrap_interval(diff: np.ndarray, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of the mean of `diff` [n] over BOOTSTRAP resamples of its rows."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(1)
    tail = (1 - level) / 2 * 100
    return [
        round(float(np.percentile(means, tail)), 2),
        round(float(np.percentile(means, 100 - tail)), 2),
    ]


def score(models: Models, qs: list[dict], progress=None) -> list[dict]:
    """Per quad: {"family", "condition", "edit", "psnr": {method: [per seed]}, "ssim": {method:
    mean over seeds}}."""
    rows = []
    for i, q in enumerate(qs):
        target = q["b2"][0]
        preds = predictions(q, models)
        rows.append(
            {
                "family": q["family"],
                "condition": q["condition"],
                "edit": q["edit"],
                "psnr": {m: [psnr(p[0], target) for p in ps] for m, ps in preds.items()},
                "ssim": {
                    m: float(np.mean([ssim(p[0], target) for p in ps])) for m, ps in preds.items()
                },
            }
        )
        if progress is not None:
            progress(i + 1, len(qs))
    return rows


def summarise(rows: list[dict], loc_labels: list[str]) -> dict:
    """The tables of `rows` (from `score`).

    "cells": {family: {condition: {"n": quads, method: {"psnr", "ssim", "psnr_seeds"}}}} with
    PSNR averaged over quads (and seeds), "psnr_seeds" one mean per seed.
    "diffs": {family: {condition: {"LABEL - baseline": {"mean", "ci95"}}}}, the paired
    difference in PSNR (seed-averaged per quad) and its bootstrap interval over the quads.
    "edits": {"family/condition/type": {method: PSNR}}."""
    cells: dict = {}
    diffs: dict = {}
    edits: dict = {}
    methods = list(rows[0]["psnr"])
    for fam in FAMILIES:
        for condition in CONDITIONS:
            group = [r for r in rows if r["family"] == fam and r["condition"] == condition]
            if not group:
                continue
            cell = {"n": len(group)}
            for m in methods:
                per = np.array([r["psnr"][m] for r in group])  # [quads, seeds]
                cell[m] = {
                    "psnr": round(float(per.mean()), 2),
                    "ssim": round(float(np.mean([r["ssim"][m] for r in group])), 3),
                    "psnr_seeds": [round(float(v), 2) for v in per.mean(0)],
                }
            cells.setdefault(fam, {})[condition] = cell
            d = {}
            for label in loc_labels:
                loc = np.array([np.mean(r["psnr"][label]) for r in group])
                for base in BASELINES:
                    other = np.array([np.mean(r["psnr"][base]) for r in group])
                    d[f"{label} - {base}"] = {
                        "mean": round(float((loc - other).mean()), 2),
                        "ci95": bootstrap_interval(loc - other),
                    }
            diffs.setdefault(fam, {})[condition] = d
            for name in dict.fromkeys(r["edit"] for r in group):
                same = [r for r in group if r["edit"] == name]
                edits[f"{fam}/{condition}/{name}"] = {
                    m: round(float(np.mean([np.mean(r["psnr"][m]) for r in same])), 2)
                    for m in methods
                }
    return {"cells": cells, "diffs": diffs, "edits": edits, "expressible": list(EXPRESSIBLE)}


def evaluate(models: Models, qs: list[dict], progress=None) -> dict:
    """`summarise(score(...))` for the LoC models `models` on the quads `qs`."""
    return summarise(score(models, qs, progress), list(models))
