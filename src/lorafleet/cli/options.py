"""Options shared by several commands, each declared once here, and `with_options`, which adds
a group of them to a command and hands the command their values as one dict."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

import typer

BASE_HELP = "Base model: default, gemma-270m, a model directory, a .gguf file or a hub id."
BaseOpt = typer.Option(..., "--base", "-b", help=BASE_HELP)
BaseDefaultOpt = typer.Option("default", "--base", "-b", help=BASE_HELP)  # benchmarks, demo
AdapterOpt = typer.Option(None, "--adapter", "-a", help="A PEFT adapter directory to attach.")
ForceOpt = typer.Option(False, "--force", help="Load an adapter trained on another base anyway.")
MaxRankOpt = typer.Option(256, "--max-rank", min=1, help="Refuse adapters above this rank.")
FedDirOpt = typer.Option(
    None, "--fed", help="A `lorafleet fed` run dir: base + its residual + its global adapter."
)
NoChatOpt = typer.Option(False, "--no-chat", help="Plain prompts, no chat template.")
SeedOpt = typer.Option(0, "--seed")
MoleDirOpt = typer.Option(
    None, "--mole", help="A MoLE directory (`lorafleet mole train`): its experts + gates."
)
MaskOpt = typer.Option(
    [], "--mask", help="Drop this MoLE expert, renormalise the rest; repeatable."
)
PortOpt = typer.Option(8000, "--port", min=1, max=65535)
DtypeOpt = typer.Option(
    "float32", "--dtype", help="float32 | bfloat16: base weights, adapters and KV cache."
)
QuantizeOpt = typer.Option(
    "none", "--quantize", help="none | int8 | int4: weight-only base linears (adapters: --dtype)."
)


def option(name: str, annotation, default, *flags: str, **kw) -> inspect.Parameter:
    """One option of a shared group: the command parameter `name`, set by `flags`."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, *flags, **kw),
    )


def with_options(**groups: tuple[inspect.Parameter, ...]) -> Callable[[Callable], Callable]:
    """Decorator: the command also takes every option of each group (listed in --help before
    its own), and receives each group's values as one dict, the argument named after the group.

        @with_options(run=FED_RUN)
        def simulate(run: dict, save_clients: bool = typer.Option(...)): ...
    """

    def wrap(command: Callable) -> Callable:
        own = [p for name, p in inspect.signature(command).parameters.items() if name not in groups]
        shared = [p for group in groups.values() for p in group]

        @functools.wraps(command)
        def run(**values):
            for group_name, group in groups.items():
                values[group_name] = {p.name: values.pop(p.name) for p in group}
            return command(**values)

        kw_own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        run.__signature__ = inspect.Signature([*shared, *kw_own])
        hints = {k: v for k, v in command.__annotations__.items() if k not in groups}
        run.__annotations__ = {**hints, **{p.name: p.annotation for p in shared}}
        return run

    return wrap


# `lorafleet fed simulate | server | app`: what a federated run is (FedConfig's fields).
FED_RUN = (
    option("base", str, ..., "--base", "-b", help=BASE_HELP),
    option(
        "data",
        str,
        ...,
        "--data",
        "-d",
        help="A built-in task (sst2, ...) or a data file, split among clients.",
    ),
    option(
        "out",
        Path,
        ...,
        "--out",
        "-o",
        help="Run dir: global/adapter/, global/residual.safetensors, metrics.json, state/.",
    ),
    option("clients", int, 4, "--clients", "-n", help="Number of clients (data partitions)."),
    option("rounds", int, 3, "--rounds", "-R"),
    option(
        "local_steps", int, 10, "--local-steps", "-S", help="Optimizer steps per client and round."
    ),
    option("aggregation", str, "fedex", "--aggregation", help="fedex | fedavg | ffa"),
    option("split", str, "iid", "--split", help="iid | dirichlet:ALPHA (non-IID; small = skewed)."),
    option("split_by", str, "label", "--split-by", help="Dirichlet over `label` or a data field."),
    option(
        "val",
        str | None,
        None,
        "--val",
        help="Held-out data (default: a built-in task's validation).",
    ),
    option("method", str, "lora", "--method", help="lora | rslora"),
    option("rank", int, 8, "--rank", "-r"),
    option("alpha", float, 16.0, "--alpha"),
    option("targets", str, "all-linear", "--targets", help="all-linear, or e.g. q_proj,v_proj"),
    option("lr", float, 1e-3, "--lr"),
    option("batch_size", int, 8, "--batch-size"),
    option("max_length", int, 512, "--max-length"),
    option("seed", int, 0, "--seed"),
    option("eval_limit", int, 200, "--eval-limit", help="Validation rows scored each round."),
    option(
        "train_limit", int | None, None, "--train-limit", help="Use only the first N training rows."
    ),
    option(
        "min_clients",
        int,
        1,
        "--min-clients",
        help="Aggregate a round only if at least this many clients replied.",
    ),
    option(
        "client_timeout",
        float | None,
        None,
        "--client-timeout",
        help="Seconds a client may take per round; later replies are skipped.",
    ),
    option(
        "norm_bound",
        float,
        10.0,
        "--norm-bound",
        help="Drop a client whose update norm is over this x the others' median.",
    ),
    option("no_chat", bool, False, "--no-chat", help="Plain prompts, no chat template."),
    option("resume", bool, False, "--resume", help="Continue from the last saved round in --out."),
)
# `fed app` writes a Flower app's run config: the options above except these.
_NOT_IN_APP = (
    "val",
    "method",
    "max_length",
    "eval_limit",
    "train_limit",
    "client_timeout",
    "norm_bound",
    "no_chat",
    "resume",
)
FED_APP = tuple(p for p in FED_RUN if p.name not in _NOT_IN_APP)

# `lorafleet fed server | client`: how to reach the Flower SuperLink.
FLOWER_LINK = (
    option(
        "superlink",
        str,
        "127.0.0.1:8000",
        "--superlink",
        help="SuperLink address, host:port (Flower's default: 8000).",
    ),
    option("insecure", bool, False, "--insecure", help="No TLS (tests on one machine only)."),
    option(
        "root_certificates",
        Path | None,
        None,
        "--root-certificates",
        help="CA certificate (PEM) that signed the SuperLink's TLS cert.",
    ),
)


def fed_config(run: dict, **more):
    """The FedConfig of a FED_RUN / FED_APP option group (--targets parsed, --no-chat flipped)."""
    from lorafleet.adapters import parse_targets
    from lorafleet.fed import FedConfig

    values = {**run, **more}
    values["targets"] = parse_targets(values["targets"])
    if "no_chat" in values:
        values["chat"] = not values.pop("no_chat")
    return FedConfig(**values)
