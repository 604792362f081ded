"""`lorafleet demo`: train a fleet of task adapters, score base vs adapters, then serve them all.

Everything lands in OUT (default runs/demo): OUT/adapters/TASK/ (each a training run dir that is
also a PEFT adapter), OUT/results.json and OUT/results.png. Adapters and figures are reused when
their plan and base are unchanged (`retrain` forces); an interrupted training resumes."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.demo.plan import TaskPlan, plans
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write_json

PLAN_FILE = "demo_plan.json"
RESULTS = "results.json"


@dataclass
class DemoConfig:
    base: str = "default"
    out: Path = Path("runs/demo")
    tasks: list[str] | None = None
    quick: bool = False
    retrain: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        self.plans = plans(self.tasks, self.quick)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Demo:
    """The demo's steps; `say` prints progress lines (the CLI passes typer.echo)."""

    def __init__(self, cfg: DemoConfig, say: Callable[[str], None] = print):
        self.cfg, self.say = cfg, say
        self.adapters = cfg.out / "adapters"
        self.base = None

    # -- steps ------------------------------------------------------------------------------
    def load(self):
        from lorafleet.models import load_base

        began = time.perf_counter()
        self.base = load_base(self.cfg.base)
        how = "from the cache" if self.base.from_cache else "converted and cached"
        self.say(
            f"[1/4] base model {self.cfg.base} loaded {how} in {time.perf_counter() - began:.1f} s"
        )
        return self.base

    def _stamp(self, plan: TaskPlan) -> dict:
        return {"plan": plan.key(), "base": self.base.fingerprint}

    def adapter_dir(self, plan: TaskPlan) -> Path:
        return self.adapters / plan.task

    def train(self, plan: TaskPlan) -> tuple[float, bool]:
        """Train (or reuse) one task's adapter. Returns (seconds, reused)."""
        from lorafleet.train import TrainConfig, Trainer

        final = self.adapter_dir(plan)
        if not self.cfg.retrain and _read_json(final / PLAN_FILE) == self._stamp(plan):
            return 0.0, True
        work = self.adapters / f".train-{plan.task}"  # renamed into place when complete
        if self.cfg.retrain or _read_json(work / PLAN_FILE) != self._stamp(plan):
            shutil.rmtree(work, ignore_errors=True)
        resume = (work / "checkpoints").is_dir()
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(work / PLAN_FILE, self._stamp(plan))
        tc = TrainConfig(
            base=self.cfg.base,
            data=plan.task,
            out=work,
            rank=plan.rank,
            alpha=plan.alpha,
            steps=plan.steps,
            lr=plan.lr,
            batch_size=plan.batch_size,
            max_length=plan.max_length,
            # The demo scores base and adapter itself, with one setting for
            # both; the trainer's own end-of-run check is kept to one row.
            eval_limit=1,
            train_limit=plan.train_limit,
            save_every=max(10, plan.steps // 4),
            resume=resume,
        )
        began = time.perf_counter()
        result = Trainer(tc).run()
        seconds = time.perf_counter() - began
        if result["interrupted"]:
            raise KeyboardInterrupt  # the checkpoint is kept: the next demo resumes it
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
        return seconds, False

    def evaluate(self, plan: TaskPlan, adapter: Path | None) -> dict:
        """The task metric on the held-out rows, for the base (adapter None) or an adapter."""
        from lorafleet.adapters import load_adapter
        from lorafleet.data import load_examples
        from lorafleet.eval import evaluate

        model = self.base.model
        if adapter is not None:
            _, model = load_adapter(adapter, model, base_fingerprint=self.base.fingerprint)
        try:
            examples = load_examples(
                plan.task, self.base.tokenizer, split="validation", limit=plan.eval_limit
            )
            figures = evaluate(
                model,
                self.base.tokenizer,
                examples,
                metrics=(examples.metric,),
                batch_size=plan.batch_size,
                max_length=plan.max_length,
                max_new_tokens=plan.max_new_tokens,
                show_progress=True,
            )
            return {
                "metric": examples.metric,
                "value": figures[examples.metric],
                "rows": figures["examples"],
            }
        finally:
            if adapter is not None:
                model.unload()  # the base's own linears back, for the next evaluation

    def run(self) -> dict:
        """Steps 1-3: load, train + evaluate every task, table figures and chart."""
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        if self.base is None:
            self.load()
        cached = _read_json(self.cfg.out / RESULTS) or {}
        rows = cached.get("tasks", {}) if cached.get("base") == self.base.fingerprint else {}
        reused_now = set()
        for i, plan in enumerate(self.cfg.plans, 1):
            stamp = self._stamp(plan)
            row = rows.get(plan.task)
            self.say(f"[2/4] task {i}/{len(self.cfg.plans)}: {plan.task}")
            seconds, reused = self.train(plan)
            if reused:
                reused_now.add(plan.task)
            took = "" if reused else f" in {seconds:.0f} s"
            how = "reused from" if reused else "trained into"
            self.say(f"      adapter {how} {self.adapter_dir(plan)}{took}")
            if reused and row and row.get("stamp") == stamp and not self.cfg.retrain:
                continue
            base_fig = row["base"] if row and row.get("stamp") == stamp else None
            if base_fig is None:
                self.say(f"      scoring the base model on {plan.task}")
                base_fig = self.evaluate(plan, None)
            self.say(f"      scoring the {plan.task} adapter")
            adapter_fig = self.evaluate(plan, self.adapter_dir(plan))
            rows[plan.task] = {
                "stamp": stamp,
                "base": base_fig,
                "adapter": adapter_fig,
                "train_seconds": round(seconds, 1)
                if not reused
                else (row or {}).get("train_seconds"),
            }
            atomic_write_json(
                self.cfg.out / RESULTS, {"base": self.base.fingerprint, "tasks": rows}
            )
        wanted = {p.task for p in self.cfg.plans}
        results = {
            "base": self.base.fingerprint,
            "tasks": {t: {**r, "reused": t in reused_now} for t, r in rows.items() if t in wanted},
        }
        results["chart"] = str(bar_chart(results["tasks"], self.cfg.out / "results.png"))
        return results


def bar_chart(rows: dict, png: Path) -> Path:
    """Base vs adapter per task, as LoRA Land's chart (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rows)
    base = [rows[t]["base"]["value"] for t in tasks]
    tuned = [rows[t]["adapter"]["value"] for t in tasks]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.6))
    xs = range(len(tasks))
    ax.bar([x - 0.2 for x in xs], base, 0.4, label="base (zero-shot)", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], tuned, 0.4, label="LoRA adapter", color="#2f7ed8")
    for x, (b, t) in enumerate(zip(base, tuned, strict=True)):
        ax.text(x - 0.2, b + 0.01, f"{b:.2f}", ha="center", fontsize=8)
        ax.text(x + 0.2, t + 0.01, f"{t:.2f}", ha="center", fontsize=8)
    labels = [f"{t}\n({rows[t]['adapter']['metric'].replace('_', ' ')})" for t in tasks]
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score on held-out rows")
    ax.set_title("lorafleet demo: base vs task adapters")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def examples_text(url: str, adapter: str, model_name: str) -> str:
    """How to call the served demo: curl and the openai client, selecting an adapter by name."""
    review = "A gorgeous, funny and moving film."
    content = (
        "Is the sentiment of this movie review positive or negative?\\n"
        f"Review: {review}\\nAnswer with one word."
    )
    return f"""
  playground:  {url}/
  models:      curl {url}/v1/models
  curl:        curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
                 -d '{{"model": "{adapter}", "max_tokens": 8, "temperature": 0,
                      "messages": [{{"role": "user", "content": "{content}"}}]}}'
  python:      from openai import OpenAI
               client = OpenAI(base_url="{url}/v1", api_key="unused")
               reply = client.chat.completions.create(model="{adapter}", temperature=0,
                   max_tokens=8, messages=[{{"role": "user", "content": "{content}"}}])
               print(reply.choices[0].message.content)
  (model="{model_name}" is the base without an adapter)
"""


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LorafleetError(f"--out {out} exists and is not a directory")
