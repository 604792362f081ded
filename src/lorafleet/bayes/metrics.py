"""Calibration metrics as pure functions (accuracy, ECE, NLL, Brier) and the reliability diagram."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

ECE_BINS = 15


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs [N, C] and labels [N] expected, got {tuple(probs.shape)} and "
            f"{tuple(labels.shape)}"
        )


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    return float((probs.argmax(1) == labels).float().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the true class (clamped away from log 0)."""
    _check(probs, labels)
    p = probs[torch.arange(len(labels)), labels]
    return float(-p.clamp_min(eps).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of sum_c (p_c - 1[c = y])^2."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin over [0, 1]: count, mean confidence, accuracy."""
    _check(probs, labels)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    # Bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 goes to bin 0.
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).float()
    conf_sum = torch.bincount(index, weights=conf.float(), minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": conf_sum / safe, "accuracy": acc_sum / safe}


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum_b |B_b|/N |accuracy(B_b) - confidence(B_b)|."""
    r = reliability(probs, labels, bins)
    n = r["count"].sum()
    return float((r["count"] / n * (r["accuracy"] - r["confidence"]).abs()).sum())


def calibration_report(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": accuracy(probs, labels),
        "ece": ece(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
    }


def reliability_diagram(
    results: dict[str, torch.Tensor],
    labels: torch.Tensor,
    path: str | Path,
    *,
    bins: int = ECE_BINS,
    title: str = "",
) -> Path:
    """Write a PNG: accuracy vs confidence per bin for each method (name -> probs [N, C])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    edges = torch.linspace(0, 1, bins + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    for ax, name in zip(axes[0], names, strict=True):
        probs = results[name]
        r = reliability(probs, labels, bins)
        has = r["count"] > 0
        acc = torch.where(has, r["accuracy"], torch.zeros_like(r["accuracy"])).tolist()
        ax.bar(centers, acc, width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
        gap = [c if h else 0 for c, h in zip(r["confidence"].tolist(), has.tolist(), strict=True)]
        ax.bar(
            centers,
            [g - a for g, a in zip(gap, acc, strict=True)],
            bottom=acc,
            width=1 / bins,
            color="red",
            alpha=0.25,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {ece(probs, labels, bins):.3f}")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
