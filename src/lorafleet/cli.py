"""The `lorafleet` command line: thin Typer commands over the library (no logic here)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import typer

from lorafleet.errors import LorafleetError

app = typer.Typer(
    name="lorafleet",
    help="Train, calibrate, federate, compose, transfer and serve LoRA adapters on one base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

BASE_HELP = "Base model: default, gemma-270m, a model directory, a .gguf file or a hub id."
BaseOpt = typer.Option(..., "--base", "-b", help=BASE_HELP)
AdapterOpt = typer.Option(None, "--adapter", "-a", help="A PEFT adapter directory to attach.")
ForceOpt = typer.Option(False, "--force", help="Load an adapter trained on another base anyway.")
MaxRankOpt = typer.Option(256, "--max-rank", min=1, help="Refuse adapters above this rank.")


def _load(base: str, adapter: Path | None, force: bool, max_rank: int):
    # Heavy imports happen here so `lorafleet --help` stays fast.
    from lorafleet.adapters import load_adapter
    from lorafleet.models import load_base

    loaded = load_base(base)
    if adapter is None:
        return loaded, None, loaded.model
    info, model = load_adapter(
        adapter, loaded.model, base_fingerprint=loaded.fingerprint, max_rank=max_rank, force=force
    )
    return loaded, info, model


@app.command()
def info(
    base: str = BaseOpt,
    adapter: Path | None = AdapterOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    force: bool = ForceOpt,
    max_rank: int = MaxRankOpt,
):
    """Describe a base model (family, size, targetable layers) and optionally an adapter.

    Examples:

        lorafleet info --base default

        lorafleet info --base default --adapter runs/sst2 --json
    """
    from lorafleet.adapters import describe_adapter
    from lorafleet.models import describe_model

    loaded, adapter_obj, _ = _load(base, adapter, force, max_rank)
    report = {
        "base": {
            "name": base,
            "model": loaded.source.display_name,
            **describe_model(loaded.model),
            "fingerprint": loaded.fingerprint,
            "load_seconds": round(loaded.load_seconds, 2),
            "from_cache": loaded.from_cache,
        }
    }
    if adapter_obj is not None:
        report["adapter"] = describe_adapter(adapter_obj, loaded.fingerprint)
        report["adapter"]["compatible"] = True  # check_adapter passed (or --force)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    for section, values in report.items():
        table = Table(title=section, show_header=False, title_justify="left")
        for key, value in values.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} x{v}" for k, v in value.items())
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            elif isinstance(value, int) and not isinstance(value, bool):
                value = f"{value:,}"
            elif isinstance(value, float):
                value = f"{value:.4g}"
            table.add_row(key, str(value))
        Console().print(table)


@app.command()
def generate(
    base: str = BaseOpt,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
    adapter: Path | None = AdapterOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, max=8192),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    no_chat: bool = typer.Option(
        False, "--no-chat", help="Send the prompt without the chat template."
    ),
    force: bool = ForceOpt,
    max_rank: int = MaxRankOpt,
):
    """Generate a reply (greedy by default) and print only the generated text.

    Examples:

        lorafleet generate --base default --prompt "What is the capital of France?"

        lorafleet generate --base default --adapter runs/sst2 --prompt "Great film!" --max-tokens 8
    """
    from lorafleet.models.generation import generate_text

    loaded, _, model = _load(base, adapter, force, max_rank)
    text = generate_text(
        model, loaded.tokenizer, prompt, max_tokens=max_tokens, chat=not no_chat,
        temperature=temperature, top_p=top_p, seed=seed,
    )  # fmt: skip
    typer.echo(text)


@app.command()
def train(
    base: str = BaseOpt,
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="A built-in task (sst2, clutrr, strategyqa, gsm8k) or a .jsonl/.csv/.tsv/.parquet.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run directory: adapter, metrics.jsonl, loss.png, checkpoints/."
    ),
    val: str | None = typer.Option(
        None, "--val", help="Validation data (default: a built-in task's validation split)."
    ),
    method: str = typer.Option("lora", "--method", help="lora | rslora | dora | bone"),
    rank: int = typer.Option(16, "--rank", "-r"),
    alpha: float = typer.Option(32.0, "--alpha"),
    targets: str = typer.Option(
        "all-linear", "--targets", help="all-linear, or a list like q_proj,v_proj"
    ),
    dropout: float = typer.Option(0.0, "--dropout"),
    steps: int | None = typer.Option(
        None, "--steps", help="Optimizer steps (default 100 unless --epochs)."
    ),
    epochs: float | None = typer.Option(None, "--epochs"),
    lr: float = typer.Option(2e-4, "--lr"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    warmup: float = typer.Option(0.05, "--warmup", help="Warmup as a fraction of the steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Per process and micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="0 turns clipping off."),
    max_length: int = typer.Option(512, "--max-length"),
    on_overflow: str = typer.Option(
        "truncate", "--on-overflow", help="truncate (prompt, from the left) | drop"
    ),
    packing: bool = typer.Option(False, "--packing"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 (autocast)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    eval_every: int = typer.Option(
        0, "--eval-every", help="Validate every N steps (0: at the end)."
    ),
    eval_limit: int | None = typer.Option(200, "--eval-limit", help="Validation rows used."),
    val_metric: list[str] = typer.Option([], "--val-metric", help="Validation metric; repeatable."),
    train_limit: int | None = typer.Option(
        None, "--train-limit", help="Use only the first N rows."
    ),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints"),
    no_chat: bool = typer.Option(False, "--no-chat", help="Plain prompts, no chat template."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest checkpoint in --out."
    ),
):
    """Fine-tune an adapter. Ctrl-C or SIGTERM saves a checkpoint; --resume continues it.

    Runs data-parallel under torchrun (gloo on CPU, nccl on GPU); --batch-size is per process.

    Examples:

        lorafleet train --base default --data sst2 --steps 300 --out runs/sst2

        lorafleet train --base default --data my.jsonl --method rslora --rank 64 --out runs/x

        torchrun --nproc-per-node 2 -m lorafleet.cli train --base default --data sst2 --out runs/ddp
    """
    from lorafleet.adapters import parse_targets
    from lorafleet.train import TrainConfig, Trainer

    cfg = TrainConfig(
        base=base, data=data, out=out, val=val, method=method, rank=rank, alpha=alpha,
        targets=parse_targets(targets), dropout=dropout, steps=steps, epochs=epochs, lr=lr,
        weight_decay=weight_decay, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
        max_grad_norm=max_grad_norm, max_length=max_length, on_overflow=on_overflow,
        packing=packing, seed=seed, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
        eval_every=eval_every, eval_limit=eval_limit, val_metrics=tuple(val_metric) or None,
        train_limit=train_limit,
        save_every=save_every, keep_checkpoints=keep_checkpoints, chat=not no_chat, resume=resume,
    )  # fmt: skip
    trainer = Trainer(cfg)
    result = trainer.run()
    if not trainer.dist.is_main:
        return 0
    if result["interrupted"]:
        typer.echo(
            f"lorafleet: stopped at step {result['steps']}/{result['total_steps']}; checkpoint "
            f"{result['checkpoint']}; continue with the same command plus --resume",
            err=True,
        )
        return 130
    val_figures = result.get("validation") or {}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in val_figures.items() if isinstance(v, float))
    typer.echo(f"adapter written to {out}" + (f" (validation: {shown})" if shown else ""))
    return 0


@app.command("eval")
def eval_cmd(
    base: str = BaseOpt,
    data: str = typer.Option(..., "--data", "-d", help="A built-in task or a data file."),
    adapter: Path | None = AdapterOpt,
    split: str = typer.Option("validation", "--split", help="train | validation (built-in tasks)."),
    metric: list[str] = typer.Option(
        [],
        "--metric",
        "-m",
        help="accuracy | exact_match | contains | perplexity; repeatable (default: the task's).",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate the first N rows only."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    max_length: int = typer.Option(1024, "--max-length", min=8),
    no_chat: bool = typer.Option(False, "--no-chat"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the figures here."),
    force: bool = ForceOpt,
    max_rank: int = MaxRankOpt,
):
    """Evaluate the base model or an adapter: task metric, loss and perplexity.

    Examples:

        lorafleet eval --base default --data sst2 --limit 500

        lorafleet eval --base default --adapter runs/clutrr --data clutrr --json clutrr.json
    """
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate

    loaded, _, model = _load(base, adapter, force, max_rank)
    examples = load_examples(data, loaded.tokenizer, split=split, chat=not no_chat, limit=limit)
    figures = evaluate(
        model, loaded.tokenizer, examples, metrics=tuple(metric) or None, batch_size=batch_size,
        max_new_tokens=max_new_tokens, max_length=max_length, show_progress=True,
    )  # fmt: skip
    report = {"base": base, "adapter": str(adapter) if adapter else None, "data": data,
              "split": split, **figures}  # fmt: skip
    _print_report({"evaluation": report})
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, json_out)
        typer.echo(f"wrote {json_out}")


bench_app = typer.Typer(
    help="Benchmarks (not tests): each prints a table and writes its figures as JSON.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("load")
def bench_load(
    models: list[str] = typer.Option(["default"], "--model", "-m", help="Repeat for several."),
    json_out: Path = typer.Option(Path("bench/results/load.json"), "--json"),
):
    """Cold (GGUF de-quantising) vs warm (cached) load time of base models.

    Example:

        lorafleet bench load --model default --model gemma-270m
    """
    from lorafleet.bench.load import run

    run(models, json_out)


@bench_app.command("train")
def bench_train(
    base: str = typer.Option("default", "--base", "-b", help=BASE_HELP),
    data: str = typer.Option("sst2", "--data", "-d"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    steps: int = typer.Option(6, "--steps", min=1, help="Timed steps per round (after 2 warmup)."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Alternating rounds per variant."),
    no_chat: bool = typer.Option(True, "--no-chat/--chat"),
    json_out: Path = typer.Option(Path("bench/results/train_step.json"), "--json"),
):
    """Training step time of lorafleet vs a plain PEFT + transformers loop, and peak memory.

    Example:

        lorafleet bench train --base default --data sst2 --batch-size 8
    """
    import tempfile

    from lorafleet.bench.train_step import run

    with tempfile.TemporaryDirectory() as scratch:
        run(base, data, batch_size, steps, rounds, not no_chat, json_out, scratch)


@bench_app.command("rslora")
def bench_rslora(
    base: str = typer.Option("default", "--base", "-b", help=BASE_HELP),
    data: str = typer.Option("gsm8k", "--data", "-d"),
    ranks: list[int] = typer.Option([4, 16, 64, 256], "--rank", "-r", help="Repeatable."),
    alpha: float = typer.Option(16.0, "--alpha"),
    steps: int = typer.Option(30, "--steps", min=1),
    lr: float = typer.Option(5e-4, "--lr"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_length: int = typer.Option(128, "--max-length", min=8),
    train_limit: int = typer.Option(2000, "--train-limit", min=1),
    eval_limit: int = typer.Option(40, "--eval-limit", min=1),
    no_chat: bool = typer.Option(True, "--no-chat/--chat"),
    out_dir: Path = typer.Option(Path("runs/rslora"), "--out"),
    json_out: Path = typer.Option(Path("bench/results/rslora.json"), "--json"),
):
    """rsLoRA reproduction: ranks x {alpha/r, alpha/sqrt(r)} on the same data and steps.

    Example:

        lorafleet bench rslora --base default --data gsm8k --steps 30
    """
    from lorafleet.bench.rslora import run

    run(base, data, ranks, alpha, steps, lr, batch_size, max_length, train_limit, eval_limit,
        not no_chat, out_dir, json_out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Library deprecation chatter is for developers; users see lorafleet's own messages.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        result = app(args=argv, prog_name="lorafleet", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.TyperException as exc:  # Typer's usage errors (bad or missing options)
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 0  # Typer has already printed the help
        typer.echo(f"lorafleet: error: {' '.join(exc.format_message().split())}", err=True)
        return 2
    except LorafleetError as exc:
        typer.echo(f"lorafleet: error: {exc}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("lorafleet: interrupted", err=True)
        return 130
    except Exception as exc:  # one line, not a traceback; LORAFLEET_DEBUG=1 re-raises
        if os.environ.get("LORAFLEET_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"lorafleet: internal error: {type(exc).__name__}: {first}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
