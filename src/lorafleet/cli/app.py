"""The `lorafleet` Typer app and its entry point (the command modules register on it)."""

from __future__ import annotations

import os
import warnings

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


def _usage_errors() -> tuple[type[Exception], ...]:
    # Typer >= 0.22 has its own exceptions; older Typer (e.g. the one Flower pins) uses Click's.
    kinds = [getattr(typer, "TyperException", None)]
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(k for k in kinds if k is not None)


USAGE_ERRORS = _usage_errors()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Library deprecation chatter is for developers; users see lorafleet's own messages.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        result = app(args=argv, prog_name="lorafleet", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except USAGE_ERRORS as exc:  # Typer's (or, on older Typer, Click's) usage errors
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
