"""The `lorafleet` command line: thin Typer commands over the library (no logic here)."""

from __future__ import annotations

import json
import os
import sys
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
