"""Tables (markdown), curves (PNG) and an archive of every metrics.jsonl from bench/gpu/run16.py.

    python3 bench/gpu/summarise16.py --runs /tmp/lf16/runs --out $OUT

Writes into --out: tables.md, bilora.png, bone.png, runs.jsonl, metrics.tar.gz (at most 5 files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tarfile
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BILORA_ORDER = ("lora", "joint", "first", "second")
BONE_ORDER = ("lora", "bone", "bat")
LABELS = {
    "lora": "LoRA",
    "joint": "P-Lambda-Q joint (control)",
    "first": "BiLoRA first-order",
    "second": "BiLoRA second-order",
    "bone": "Bone",
    "bat": "Bat",
}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[dict]]:
    """(step, train loss) pairs and the validation records of one run."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    return train, [r for r in rows if r.get("split") == "val"]


def smooth(values: list[float], beta: float = 0.8) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def fmt(x, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bilora_section(recs: list[dict], runs: Path) -> str:
    ok = [r for r in recs if r.get("experiment") == "bilora" and r.get("status") == "ok"]
    base = next((r for r in ok if r["variant"] == "base"), None)
    by = defaultdict(list)
    for r in ok:
        if r["variant"] != "base":
            by[r["variant"]].append(r)
    rows = []
    for v in (v for v in BILORA_ORDER if v in by):
        rs = by[v]
        peaks = [
            max((x.get("val_accuracy") or 0) for x in curves(runs / r["name"])[1] or [{}])
            for r in rs
        ]
        rows.append(
            [
                LABELS[v],
                f"{rs[0].get('trainable_params', 0):,}",
                len(rs),
                mean_sd([r.get("val_accuracy") for r in rs]),
                mean_sd(peaks),
                mean_sd([r.get("train_accuracy") for r in rs]),
                mean_sd(
                    [
                        r["train_accuracy"] - r["val_accuracy"]
                        for r in rs
                        if r.get("train_accuracy") is not None and r.get("val_accuracy") is not None
                    ]
                ),
                mean_sd([r.get("val_loss") for r in rs]),
                fmt(
                    statistics.median(
                        [r["median_step_s"] for r in rs if r.get("median_step_s")] or [0.0]
                    ),
                    4,
                ),
            ]
        )
    out = "## BiLoRA vs LoRA (sst2, small training set)\n\n"
    if base:
        out += f"Base model alone: validation accuracy {fmt(base.get('val_accuracy'))}.\n\n"
    out += table(
        [
            "variant",
            "trainable params",
            "seeds",
            "final val acc",
            "peak val acc",
            "train acc",
            "train - val gap",
            "final val loss",
            "s/step (median)",
        ],
        rows,
    )
    per_seed = [
        [
            LABELS[r["variant"]],
            r["seed"],
            fmt(r.get("val_accuracy")),
            fmt(r.get("train_accuracy")),
            fmt(r.get("val_loss")),
        ]
        for v in BILORA_ORDER
        for r in sorted(by.get(v, []), key=lambda r: r["seed"])
    ]
    out += "\nPer seed:\n\n" + table(
        ["variant", "seed", "val acc", "train acc", "val loss"], per_seed
    )
    return out


def bone_best(by: dict) -> dict:
    """Per method, the run with the lowest final validation loss over the learning rates."""
    return {m: min(rs, key=lambda r: r.get("val_loss") or float("inf")) for m, rs in by.items()}


def train_loss_at(run_dir: Path, fraction: float) -> float | None:
    train, _ = curves(run_dir)
    if not train:
        return None
    losses = smooth([loss for _, loss in train])
    return losses[min(len(losses) - 1, max(0, round(fraction * len(losses)) - 1))]


def bone_section(recs: list[dict], runs: Path) -> str:
    ok = [r for r in recs if r.get("experiment") == "bone" and r.get("status") == "ok"]
    base = next((r for r in ok if r["variant"] == "base"), None)
    by = defaultdict(list)
    for r in ok:
        if r["variant"] != "base":
            by[r["variant"]].append(r)
    grid = []
    for m in (m for m in BONE_ORDER if m in by):
        for r in sorted(by[m], key=lambda r: r["lr"]):
            d = runs / r["name"]
            grid.append(
                [
                    LABELS[m],
                    f"{r['lr']:g}",
                    f"{r.get('trainable_params', 0):,}",
                    fmt(train_loss_at(d, 0.25)),
                    fmt(train_loss_at(d, 0.5)),
                    fmt(train_loss_at(d, 1.0)),
                    fmt(r.get("val_loss")),
                    fmt(r.get("val_exact_match")),
                    fmt(r.get("median_step_s"), 4),
                ]
            )
    best = bone_best(by)
    lrs = sorted({r["lr"] for rs in by.values() for r in rs})
    best_rows = []
    for m in (m for m in BONE_ORDER if m in best):
        r = best[m]
        edge = " (grid edge)" if len(lrs) > 1 and r["lr"] in (lrs[0], lrs[-1]) else ""
        d = runs / r["name"]
        best_rows.append(
            [
                LABELS[m],
                f"{r['lr']:g}{edge}",
                fmt(train_loss_at(d, 0.25)),
                fmt(train_loss_at(d, 0.5)),
                fmt(r.get("val_loss")),
                fmt(r.get("val_exact_match")),
            ]
        )
    out = "## Bone / Bat vs LoRA (clutrr, equal trainable parameters)\n\n"
    if base:
        out += (
            f"Base model alone: validation loss {fmt(base.get('val_loss'))}, exact match "
            f"{fmt(base.get('val_exact_match'))}.\n\n"
        )
    out += "Best learning rate per method (lowest final validation loss):\n\n"
    out += table(
        [
            "method",
            "best lr",
            "train loss @25%",
            "train loss @50%",
            "final val loss",
            "val exact match",
        ],
        best_rows,
    )
    out += "\nEvery run (train loss smoothed, EMA 0.8):\n\n"
    out += table(
        [
            "method",
            "lr",
            "trainable params",
            "train loss @25%",
            "@50%",
            "@100%",
            "final val loss",
            "val exact match",
            "s/step (median)",
        ],
        grid,
    )
    return out


def plot_bilora(recs: list[dict], runs: Path, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in BILORA_ORDER:
        rs = [
            r
            for r in recs
            if r.get("experiment") == "bilora" and r.get("variant") == v and r.get("status") == "ok"
        ]
        for i, r in enumerate(rs):
            train, val = curves(runs / r["name"])
            label = LABELS[v] if i == 0 else None
            color = f"C{BILORA_ORDER.index(v)}"
            if val:
                ax1.plot(
                    [x["step"] for x in val],
                    [x.get("val_accuracy") for x in val],
                    color=color,
                    alpha=0.8,
                    label=label,
                    marker=".",
                )
            if train:
                ax2.plot(
                    [s for s, _ in train],
                    smooth([x for _, x in train]),
                    color=color,
                    alpha=0.7,
                    label=label,
                )
    ax1.set(xlabel="step", ylabel="validation accuracy", title="sst2 validation (each seed)")
    ax2.set(xlabel="step", ylabel="train loss (EMA 0.8)", title="training loss", yscale="log")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bone(recs: list[dict], runs: Path, path: Path) -> None:
    ok = [
        r
        for r in recs
        if r.get("experiment") == "bone" and r.get("status") == "ok" and r.get("variant") != "base"
    ]
    by = defaultdict(list)
    for r in ok:
        by[r["variant"]].append(r)
    best = bone_best(by)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, rs in by.items():
        color = f"C{BONE_ORDER.index(m)}"
        for r in rs:
            train, val = curves(runs / r["name"])
            is_best = r is best[m]
            kw = dict(color=color, alpha=1.0 if is_best else 0.25, lw=1.8 if is_best else 0.8)
            label = f"{LABELS[m]} lr {r['lr']:g}" + (" (best)" if is_best else "")
            if train:
                ax1.plot([s for s, _ in train], smooth([x for _, x in train]), label=label, **kw)
            if val:
                ax2.plot(
                    [x["step"] for x in val],
                    [x.get("val_loss") for x in val],
                    marker=".",
                    label=label,
                    **kw,
                )
    ax1.set(
        xlabel="step", ylabel="train loss (EMA 0.8)", title="clutrr training loss", yscale="log"
    )
    ax2.set(xlabel="step", ylabel="validation loss", title="clutrr validation loss")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KEPT = (
    "metrics.jsonl",
    "train_config.json",
    "runs.jsonl",
    "lorafleet.json",
    "adapter_config.json",
    "run16.log",
)


def archive(runs: Path, path: Path) -> None:
    """Every run's metrics.jsonl, train_config.json and adapter metadata (no weights)."""
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(runs.rglob("*")):
            if f.is_file() and f.name in KEPT and "checkpoints" not in f.parts:
                tar.add(f, arcname=str(f.relative_to(runs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recs = read_jsonl(args.runs / "runs.jsonl")
    meta = next((r for r in recs if r.get("experiment") == "meta"), {})
    failed = [r for r in recs if str(r.get("status", "ok")) != "ok"]
    text = "# Issue 16 experiments\n\n"
    text += f"Base `{meta.get('base')}` on {meta.get('gpu') or meta.get('device')} (torch "
    text += f"{meta.get('torch')}); quick={meta.get('quick')}; ranks {meta.get('ranks')}.\n\n"
    text += bilora_section(recs, args.runs) + "\n" + bone_section(recs, args.runs)
    if failed:
        text += "\n## Runs that did not finish\n\n" + table(
            ["run", "status"], [[r.get("name"), r.get("status")] for r in failed]
        )
    text += (
        "\n## Commands\n\n"
        + "\n".join(f"    {r['command']}" for r in recs if r.get("command"))
        + "\n"
    )
    (args.out / "tables.md").write_text(text)
    plot_bilora(recs, args.runs, args.out / "bilora.png")
    plot_bone(recs, args.runs, args.out / "bone.png")
    if (args.runs / "runs.jsonl").is_file():
        shutil.copyfile(args.runs / "runs.jsonl", args.out / "runs.jsonl")
    archive(args.runs, args.out / "metrics.tar.gz")
    print(text)
    print(f"summarise16: wrote {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
