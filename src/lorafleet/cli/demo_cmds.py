"""`lorafleet demo`: LoRA Land on one laptop (train a fleet, score it, serve it)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.options import BaseDefaultOpt, PortOpt


@app.command()
def demo(
    base: str = BaseDefaultOpt,
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Adapters, figures, chart."),
    task: list[str] = typer.Option(
        [], "--task", "-t", help="sst2 | strategyqa | clutrr; repeatable (default: all three)."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny step counts (CI): seconds, not minutes."
    ),
    retrain: bool = typer.Option(
        False, "--retrain", help="Train and score again, ignoring caches."
    ),
    no_serve: bool = typer.Option(False, "--no-serve", help="Stop after the table and chart."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = PortOpt,
):
    """Fine-tune task adapters from the shared data, compare each with the base, then serve them.

    1. loads the base (cached after the first run); 2. trains one LoRA adapter per task (sst2
    sentiment, strategyqa yes/no, clutrr kinship) with progress bars, reusing cached adapters;
    3. scores base and adapters on each task's held-out rows: a table and OUT/results.png;
    4. serves every adapter (OpenAI-compatible API + playground) until Ctrl-C.

    Examples:

        lorafleet demo

        lorafleet demo --no-serve --task sst2 --task clutrr

        lorafleet demo --quick --no-serve --out /tmp/demo
    """
    from rich.console import Console
    from rich.table import Table

    from lorafleet.demo.run import Demo, DemoConfig, check_out, examples_text

    check_out(out)
    cfg = DemoConfig(base=base, out=out, tasks=task or None, quick=quick, retrain=retrain)
    runner = Demo(cfg, say=lambda line: typer.echo(line, err=True))
    results = runner.run()
    table = Table(title="[3/4] held-out scores: base model vs task adapter", title_justify="left")
    for col in ("task", "metric", "rows", "base", "adapter", "gain", "train (s)"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, row in results["tasks"].items():
        b, a = row["base"]["value"], row["adapter"]["value"]
        seconds = row.get("train_seconds")
        took = "?" if seconds is None else f"{seconds:.0f}"
        took += " (cached)" if row.get("reused") else ""
        table.add_row(
            name,
            row["adapter"]["metric"],
            str(row["adapter"]["rows"]),
            f"{b:.3f}",
            f"{a:.3f}",
            f"{a - b:+.3f}",
            took,
        )
    Console().print(table)
    typer.echo(f"chart: {results['chart']}   figures: {out / 'results.json'}")
    if no_serve:
        return 0
    from lorafleet.bayes.serving import laplace_classifier
    from lorafleet.serve.api import ServerConfig
    from lorafleet.serve.api.server import build_state, serve_forever

    config = ServerConfig(model_name=base)
    state = build_state(runner.base, runner.adapters, config=config, classifier=laplace_classifier)
    names = state.adapter_names()
    url = f"http://{host}:{port}"
    typer.echo(f"\n[4/4] serving {base} + adapters {', '.join(names)} on {url} (Ctrl-C stops)")
    example = "sst2" if "sst2" in names else (names[0] if names else base)
    typer.echo(examples_text(url, example, base))
    serve_forever(state, host, port)
    return 0
