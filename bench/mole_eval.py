"""MoLE vs merges (issue 29): per-row held-out scores of each configuration, then the table,
paired bootstrap intervals over rows and the gates' loss curves.

    python bench/mole_eval.py eval OUT --base default NAME=adapter:DIR[@TASK+...] NAME=mole:DIR
    python bench/mole_eval.py report OUT --results bench/results/mole29

`eval` scores each configuration on every task's first N validation rows (TASKS below: the
demo's held-out rows; the gates train on the train split only) and writes
OUT/eval/NAME--TASK.json with the score and each row's 0/1; configurations already scored are
skipped. `report` writes RESULTS/table.md, RESULTS/results.json and RESULTS/gate_loss.png."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASKS = {"sst2": (150, 128), "strategyqa": (150, 128), "clutrr": (50, 320)}  # rows, max length
MERGES = ("linear-avg", "ties", "dare-ties")


def _score_rows(model, tokenizer, task: str) -> dict:
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate
    from lorafleet.eval.metrics import exact_match

    limit, max_length = TASKS[task]
    examples = load_examples(task, tokenizer, split="validation", limit=limit)
    r = evaluate(
        model,
        tokenizer,
        examples,
        metrics=(examples.metric,),
        max_length=max_length,
        return_predictions=True,
    )
    rows = examples.examples
    if examples.metric == "accuracy":
        correct = [
            int(p == ex.choices[ex.label]) for p, ex in zip(r["predictions"], rows, strict=True)
        ]
    else:
        correct = [
            int(exact_match([p], [ex.target], examples.answer_marker) == 1.0)
            for p, ex in zip(r["predictions"], rows, strict=True)
        ]
    return {"metric": examples.metric, "score": sum(correct) / len(correct), "correct": correct}


def run_eval(out: Path, base: str, configs: list[str]) -> None:
    from lorafleet.adapters import attach, read_adapter
    from lorafleet.compose.mole import load_mole_base
    from lorafleet.models import load_base

    (out / "eval").mkdir(parents=True, exist_ok=True)
    for spec in configs:
        name, _, rest = spec.partition("=")
        kind, _, path = rest.partition(":")
        path, _, only = path.partition("@")  # DIR@TASK+TASK: score on those tasks only
        tasks = only.split("+") if only else list(TASKS)
        todo = [t for t in tasks if not (out / "eval" / f"{name}--{t}.json").exists()]
        if not todo:
            continue
        if kind == "mole":
            loaded, mole = load_mole_base(base, path)
            model = mole.model
        elif kind == "adapter":
            loaded = load_base(base)
            model = attach(loaded.model, read_adapter(path))
        else:
            raise SystemExit(f"{spec}: kind must be adapter or mole")
        for task in todo:
            result = _score_rows(model, loaded.tokenizer, task)
            f = out / "eval" / f"{name}--{task}.json"
            f.write_text(json.dumps({"config": name, "task": task, **result}))
            print(f"{name:>18} {task:>10} {result['score']:.3f}", flush=True)


def _load(out: Path) -> dict:
    scores = {}
    for f in sorted((out / "eval").glob("*--*.json")):
        r = json.loads(f.read_text())
        scores.setdefault(r["config"], {})[r["task"]] = r["correct"]
    return scores


def _avg(per_task: dict, idx: dict | None = None) -> float:
    vals = []
    for t in TASKS:
        rows = per_task[t]
        pick = idx[t] if idx else range(len(rows))
        vals.append(sum(rows[i] for i in pick) / len(pick))
    return sum(vals) / len(vals)


def _flatness(metrics: Path) -> dict:
    """The task-balanced loss over the run, as the mean of each quarter of the steps (the lr
    follows a cosine to 0, so a flat end alone could be the schedule: equal 2nd-4th quarters
    show a plateau reached early), with the last step's temperature and balancing loss."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    loss = [r.get("task_loss", r["loss"]) for r in rows]
    n = len(loss)
    q = [loss[i * n // 4 : (i + 1) * n // 4] for i in range(4)]
    return {
        "steps": n,
        "quarter_means": [round(sum(x) / max(1, len(x)), 4) for x in q],
        "tau_last": rows[-1].get("tau"),
        "balance_last": rows[-1].get("balance"),
    }


def report(out: Path, results: Path, boots: int = 2000) -> None:
    scores = _load(out)
    oracle = {t: scores[f"expert-{t}"][t] for t in TASKS if f"expert-{t}" in scores}
    if len(oracle) == len(TASKS):
        scores["oracle"] = oracle
    complete = {n: s for n, s in scores.items() if all(t in s for t in TASKS)}
    moles = sorted(n for n in complete if n.startswith("mole"))
    merges = [m for m in MERGES if m in complete]
    rng = random.Random(0)
    sizes = {t: len(next(iter(complete.values()))[t]) for t in TASKS}
    samples = [
        {t: [rng.randrange(n) for _ in range(n)] for t, n in sizes.items()} for _ in range(boots)
    ]

    def interval(fn):
        vals = sorted(fn(idx) for idx in samples)
        return [round(vals[int(0.025 * boots)], 4), round(vals[int(0.975 * boots) - 1], 4)]

    def best_merge(idx):
        return max(_avg(complete[m], idx) for m in merges)

    table = [
        "| configuration | " + " | ".join(TASKS) + " | average |",
        "|---" * (len(TASKS) + 2) + "|",
    ]
    order = [*moles, "oracle", *merges, *(n for n in sorted(complete) if n.startswith("expert-"))]
    summary = {"rows": {t: n for t, n in sizes.items()}, "configs": {}, "comparisons": {}}
    for name in order:
        if name not in complete:
            continue
        per = {t: sum(complete[name][t]) / len(complete[name][t]) for t in TASKS}
        avg = _avg(complete[name])
        summary["configs"][name] = {**per, "average": avg}
        cells = [f"{per[t]:.3f}" for t in TASKS] + [f"{avg:.3f}"]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    if merges:
        for m in moles:
            comp = {
                "minus_best_merge": _avg(complete[m]) - best_merge(None),
                "minus_best_merge_95ci": interval(
                    lambda idx, m=m: _avg(complete[m], idx) - best_merge(idx)
                ),
            }
            if "oracle" in complete:
                comp["gap_to_oracle"] = _avg(complete["oracle"]) - _avg(complete[m])
                comp["best_merge_gap_to_oracle"] = _avg(complete["oracle"]) - best_merge(None)
            summary["comparisons"][m] = comp
    summary["gate_loss"] = {
        d.name: _flatness(d / "metrics.jsonl")
        for d in sorted((out / "adapters").glob("mole*"))
        if (d / "metrics.jsonl").exists()
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "table.md").write_text("\n".join(table) + "\n")
    (results / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(table))
    print(
        json.dumps(
            {"comparisons": summary["comparisons"], "gate_loss": summary["gate_loss"]}, indent=1
        )
    )
    _plot(out, results)


def _plot(out: Path, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for d in sorted((out / "adapters").glob("mole*")):
        f = d / "metrics.jsonl"
        if not f.exists():
            continue
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        loss = [r.get("task_loss", r["loss"]) for r in rows]
        w = max(1, len(loss) // 20)  # moving average over a twentieth of the run
        smooth = [
            sum(loss[max(0, i - w + 1) : i + 1]) / len(loss[max(0, i - w + 1) : i + 1])
            for i in range(len(loss))
        ]
        ax.plot(range(1, len(loss) + 1), smooth, label=d.name)
    ax.set_xlabel("gate step")
    ax.set_ylabel("task-balanced loss (moving avg)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "gate_loss.png", dpi=110)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["eval", "report"])
    p.add_argument("out", type=Path)
    p.add_argument("configs", nargs="*")
    p.add_argument("--base", default="default")
    p.add_argument("--results", type=Path, default=Path("bench/results/mole29"))
    p.add_argument("--tasks", default="", help="TASK=ROWS,... overrides (toy runs)")
    args = p.parse_intermixed_args(argv)
    for item in filter(None, args.tasks.split(",")):
        t, _, n = item.partition("=")
        TASKS[t] = (int(n), TASKS[t][1])
    if args.what == "eval":
        run_eval(args.out, args.base, args.configs)
    else:
        report(args.out, args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
