"""Experiment: the demo's task adapters alone vs merged (linear, TIES, DARE-TIES), per task.

Every adapter under `adapters_dir/<task>` is scored on every task's held-out rows (the demo's
evaluation settings), then the merges of all of them: `linear` at equal weights 1/n (the mean
delta, exact), `ties` and `dare_ties` at weight 1 each (TIES' lambda = 1) with `density`.
This is the baseline a mixture of LoRA experts (MoLE) must beat."""

from __future__ import annotations

from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.errors import LorafleetError

TASKS = ("sst2", "strategyqa", "clutrr")


def _score(base, adapter, plan) -> float:
    from lorafleet.adapters import attach
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate

    model = attach(base.model, adapter)
    try:
        examples = load_examples(
            plan.task, base.tokenizer, split="validation", limit=plan.eval_limit
        )
        figures = evaluate(
            model,
            base.tokenizer,
            examples,
            metrics=(examples.metric,),
            batch_size=plan.batch_size,
            max_length=plan.max_length,
            max_new_tokens=plan.max_new_tokens,
            show_progress=True,
        )
        return float(figures[examples.metric])
    finally:
        model.unload()


def _variants(adapters: dict, density: float, seed: int) -> dict:
    from lorafleet.compose import merge_adapters

    names, parts = list(adapters), list(adapters.values())
    n = len(parts)
    out = dict(adapters)
    recipes = {
        "linear": ([1.0 / n] * n, {}),
        "ties": ([1.0] * n, {"density": density}),
        "dare_ties": ([1.0] * n, {"density": density, "seed": seed}),
    }
    for method, (weights, kw) in recipes.items():
        merged = merge_adapters(parts, weights, method, names=names, progress=True, **kw)
        out[f"{method} merge"] = merged
    return out


def _chart(rows: list[dict], tasks: list[str], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [row[t] for t in tasks], width, label=row["adapter"])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("task score")
    ax.set_title("Task adapters alone vs merged")
    ax.legend(fontsize=7, ncol=2)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def run(
    base: str = "default",
    adapters_dir: str | Path = "runs/demo/adapters",
    density: float = 0.5,
    seed: int = 0,
    quick: bool = False,
    json_out: str | Path = "bench/results/merges.json",
) -> list[dict]:
    from lorafleet.adapters import check_adapter, read_adapter
    from lorafleet.demo.plan import plans
    from lorafleet.models import load_base

    root = Path(adapters_dir)
    missing = [t for t in TASKS if not (root / t).is_dir()]
    if missing:
        hint = "train them with `lorafleet demo --no-serve` (writes runs/demo/adapters)"
        raise LorafleetError(f"{root}: no {missing[0]}/ adapter; {hint}")
    loaded = load_base(base)
    adapters = {t: read_adapter(root / t) for t in TASKS}
    for a in adapters.values():
        check_adapter(a, loaded.model, base_fingerprint=loaded.fingerprint)
    variants = _variants(adapters, density, seed)
    task_plans = plans(list(TASKS), quick)
    rows = []
    for name, adapter in variants.items():
        row = {"adapter": name if name not in TASKS else f"{name} alone"}
        for plan in task_plans:
            row[plan.task] = _score(loaded, adapter, plan)
        row["mean"] = sum(row[t] for t in TASKS) / len(TASKS)
        merge = adapter.meta.get("merge") or {}
        row["rank"], row["truncation_error"] = adapter.rank, merge.get("relative_error")
        rows.append(row)
        print_table([row], ["adapter", *TASKS, "mean"])
    print_table(rows, ["adapter", *TASKS, "mean", "rank", "truncation_error"])
    png = _chart(rows, list(TASKS), Path(json_out).with_suffix(".png"))
    write_json(
        json_out,
        {
            "base": base,
            "density": density,
            "seed": seed,
            "quick": quick,
            "eval_rows": {p.task: p.eval_limit for p in task_plans},
            "rows": rows,
            "chart": str(png),
        },
    )
    print(f"wrote {json_out} and {png}")
    return rows
