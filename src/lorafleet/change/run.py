"""The entry points `lorafleet change` calls: train, apply, evaluate, write example images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.change import apply as ap
from lorafleet.change.evaluate import BASELINES, evaluate, predictions, quads
from lorafleet.change.grid import save_grid
from lorafleet.change.photos import HELDOUT_PHOTOS, load_photo
from lorafleet.change.sampling import seen_edit, unseen_edit
from lorafleet.change.store import ChangeConfig, load_model
from lorafleet.change.train import Trainer
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write_json


def train_model(cfg: ChangeConfig, out: Path, resume: bool = False, quiet: bool = False) -> Path:
    """Pre-train the editor, then the hypernetwork, with a progress bar per phase."""
    from tqdm.auto import tqdm

    trainer = Trainer(cfg, out, resume=resume)
    bars: dict = {}

    def progress(phase, step, total, losses):
        if quiet:
            return
        if phase not in bars:
            bars[phase] = tqdm(total=total, initial=step - 1, desc=phase, unit="step")
        bars[phase].update(1)
        bars[phase].set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)

    try:
        return trainer.run(progress)
    finally:
        for bar in bars.values():
            bar.close()


def apply_change(
    model: Path,
    image: Path,
    out: Path,
    before: Path | None = None,
    after: Path | None = None,
    lora: Path | None = None,
    save_lora: Path | None = None,
) -> dict:
    """Edit `image` the way before -> after shows (or with a saved LoC adapter); write a PNG."""
    if (before is None) != (after is None):
        raise LorafleetError("give both --before and --after (the example pair)")
    if (before is None) == (lora is None):
        raise LorafleetError("give either an example pair (--before/--after) or --lora DIR")
    cfg, editor, hyper = load_model(model)
    x = ap.read_png(image)
    scale = 1.0
    if lora is not None:
        delta, scale = ap.load_lora(lora, editor)
    else:
        delta = ap.emit_lora(hyper, ap.read_png(before), ap.read_png(after), cfg.image_size)
        if save_lora is not None:
            ap.save_lora(save_lora, delta, cfg.rank, {"loc_model": str(model)})
    ap.write_png(out, ap.edit(editor, delta, x, scale))
    return {"out": str(out), "size": list(x.shape[-2:]), "lora": str(save_lora or lora or "")}


def _grid_rows(qs, models, rows_per_group: int) -> list[dict]:
    """One quad per edit type, evenly spread over each family's types, for each condition."""
    firsts: dict = {}
    for q in qs:
        firsts.setdefault((q["family"], q["condition"]), {}).setdefault(q["edit"], q)
    picked = []
    for by_type in firsts.values():
        types = list(by_type.values())
        step = max(1.0, len(types) / rows_per_group)
        picked += [types[int(i * step)] for i in range(min(rows_per_group, len(types)))]
    rows = []
    for q in picked:
        preds = {m: p[0] for m, p in predictions(q, models).items()}  # the first seed's
        label = f"{q['condition']}: {q['label']}"
        row = {"label": label, "A": q["a"], "A'": q["a2"], "B": q["b"]}
        rows.append({**row, "true B'": q["b2"], **preds})
    return rows


def evaluate_models(
    models: list[tuple[str, Path]],
    out: Path,
    per_edit: int = 8,
    seed: int = 0,
    rows_per_group: int = 9,
) -> dict:
    """Score the LoC models ((label, dir); a label given several times: one model per training
    seed) and the baselines; write results.json and grid.png."""
    from tqdm.auto import tqdm

    loaded: dict = {}
    size = None
    for label, folder in models:
        cfg, editor, hyper = load_model(folder)
        if size not in (None, cfg.image_size):
            raise LorafleetError("the models were trained at different image sizes")
        size = cfg.image_size
        loaded.setdefault(label, []).append((editor, hyper))
    torch.manual_seed(seed)
    qs = quads(seed, per_edit, size)
    with tqdm(total=len(qs), desc="evaluating", unit="quad") as bar:
        results = evaluate(loaded, qs, lambda i, n: bar.update(1))
    results["settings"] = {
        "models": [[label, str(folder)] for label, folder in models],
        "per_edit": per_edit,
        "seed": seed,
        "heldout_photos": list(HELDOUT_PHOTOS),
    }
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    columns = ["A", "A'", "B", "true B'", *loaded, *BASELINES]
    save_grid(out / "grid.png", _grid_rows(qs, loaded, rows_per_group), columns)
    return results


def example_images(edit: str = "hue", unseen: bool = False, seed: int = 0):
    """(edit label, {"before", "after", "image", "truth": [1, 3, 64, 64]}) cut from held-out
    photos: an example pair and a query with its true answer."""
    g = torch.Generator().manual_seed(seed)
    e = unseen_edit(g, edit) if unseen else seen_edit(g, edit)
    a = load_photo("chelsea")[None, :, 20:84, 40:104]
    b = load_photo("sklearn:china")[None, :, 40:104, 60:124]
    return e.label(), {"before": a, "after": e(a), "image": b, "truth": e(b)}


def write_examples(out: Path, edit: str = "hue", unseen: bool = False, seed: int = 0) -> dict:
    """An example pair and a query from held-out photos (+ the true answer) as PNGs."""
    label, images = example_images(edit, unseen, seed)
    out = Path(out)
    for name, x in images.items():
        ap.write_png(out / f"{name}.png", x)
    atomic_write_json(out / "edit.json", {"edit": label})
    return {"edit": label, "files": [str(out / f"{n}.png") for n in images]}


def results_table(results: dict) -> str:
    """Markdown table: mean PSNR (dB) per family, condition and method (quads, seeds)."""
    cells = results["cells"]
    first = next(iter(next(iter(cells.values())).values()))
    methods = [m for m in first if m != "n"]
    lines = [
        "| family | edits | quads | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 3) + "|",
    ]
    for fam, by_condition in cells.items():
        for condition, cell in by_condition.items():
            row = [fam, condition, str(cell["n"]), *(f"{cell[m]['psnr']:.2f}" for m in methods)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def diffs_table(results: dict) -> str:
    """Markdown table: each LoC model minus identity, "G alone" and difference (dB, 95%
    bootstrap interval over the quads)."""
    lines = []
    for fam, by_condition in results["diffs"].items():
        for condition, d in by_condition.items():
            keys = [k for k in d if k.endswith((" - identity", " - G alone", " - difference"))]
            if not lines:
                lines = [
                    "| family | edits | " + " | ".join(keys) + " |",
                    "|---" * (len(keys) + 2) + "|",
                ]
            cells = [
                f"{d[k]['mean']:+.2f} [{d[k]['ci95'][0]:+.2f}, {d[k]['ci95'][1]:+.2f}]"
                for k in keys
            ]
            lines.append(f"| {fam} | {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())
