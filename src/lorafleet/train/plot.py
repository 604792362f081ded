"""The loss-curve PNG written next to a trained adapter."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_file: Path, png: Path) -> Path | None:
    """Training loss per step, and validation loss where measured; None when nothing to plot."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("split") == "val"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
    return png
