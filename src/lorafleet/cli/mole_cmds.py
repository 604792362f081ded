"""`lorafleet mole train`: a Mixture of LoRA Experts (per-layer gates over frozen adapters)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.common import print_report
from lorafleet.cli.options import BaseOpt, NoChatOpt, SeedOpt

mole_app = typer.Typer(
    help="Mixture of LoRA Experts (MoLE): gates per layer over frozen adapters.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(mole_app, name="mole")


@mole_app.command("train")
def train(
    base: str = BaseOpt,
    expert: list[str] = typer.Option(..., "--expert", "-e", help="NAME=DIR, repeatable."),
    data: list[str] = typer.Option(
        ..., "--data", "-d", help="TASK_OR_FILE[@WEIGHT], repeatable: sampled in proportion."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The MoLE directory to write."),
    steps: int = typer.Option(300, "--steps", min=1),
    lr: float = typer.Option(5e-3, "--lr", min=0.0),
    batch_size: int = typer.Option(
        12, "--batch-size", min=1, help="Rows per step, drawn evenly across the --data tasks."
    ),
    balance_weight: float = typer.Option(
        0.5,
        "--balance-weight",
        min=0.0,
        help="beta of the balancing loss -log prod_i q_i (0.5: the paper's).",
    ),
    temperature: float = typer.Option(
        1.0,
        "--temperature",
        min=1e-6,
        help="Softmax tau: the initial one for block gates (learnt), fixed for linear / input.",
    ),
    gate: str = typer.Option(
        "block",
        "--gate",
        help="block (the paper: one gate per transformer block on the experts' outputs, "
        "learnable temperature) | linear (one gate per adapted linear on its experts' outputs, "
        "fixed tau; the default before issue 29) | input (one gate per linear on the layer "
        "input, fixed tau).",
    ),
    train_limit: int | None = typer.Option(
        None, "--train-limit", min=1, help="Rows read from each source."
    ),
    max_length: int = typer.Option(512, "--max-length", min=8),
    save_every: int = typer.Option(50, "--save-every", min=1),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/."),
    no_chat: bool = NoChatOpt,
    seed: int = SeedOpt,
):
    """Train only the gates (one per transformer block by default; experts and base frozen)
    on a mix of tasks, task-balanced (rows drawn evenly per --data source, each task's mean
    row loss weighing the same), then write OUT/mole_config.json (experts by relative path
    and sha256, gate variant, temperature, base fingerprint) and OUT/gates.safetensors.
    Departures from the paper: the gate is per token (the paper's flattens a whole
    sequence, which generation cannot), and a block gate reads its experts' outputs at the
    block's first adapted linear (e.g. q_proj), since running every expert's whole block
    separately would need one KV cache per expert.

    Examples:

        lorafleet mole train -b default -e sst2=runs/sst2 -e clutrr=runs/clutrr -e sqa=runs/sqa
        -d sst2 -d clutrr -d strategyqa --train-limit 200 --steps 300 -o runs/mole

        lorafleet mole train -b default -e a=A -e b=B -d mixed.jsonl --gate input -o runs/mole

        lorafleet eval -b default --mole runs/mole -d sst2 --mask clutrr
    """
    from lorafleet.compose.mole import MoleError, parse_expert
    from lorafleet.compose.mole_train import MoleTrainConfig, train_mole

    if gate not in ("block", "linear", "input", "outputs"):  # outputs: linear's old name
        raise MoleError(f"--gate must be block, linear or input, got {gate!r}")
    cfg = MoleTrainConfig(
        base=base,
        experts=[parse_expert(e) for e in expert],
        data=data,
        out=out,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        balance_weight=balance_weight,
        temperature=temperature,
        variant=gate,
        train_limit=train_limit,
        max_length=max_length,
        chat=not no_chat,
        seed=seed,
        save_every=save_every,
        resume=resume,
    )
    summary = train_mole(cfg)
    if summary.get("interrupted"):
        typer.echo(f"stopped; checkpoint {summary['checkpoint']} (continue with --resume)")
        return 130
    print_report({"mole": summary})
    typer.echo(f"wrote {out}")


@mole_app.command("bundle")
def bundle(
    src: Path = typer.Argument(..., help="The MoLE directory (from `lorafleet mole train`)."),
    out: Path = typer.Option(..., "--out", "-o", help="The self-contained MoLE dir to write."),
):
    """Write a self-contained copy of a MoLE: its gates and config plus a copy of every expert
    (OUT/experts/NAME), so OUT serves and evaluates from any location (`lorafleet serve
    --adapters`, `eval --mole`). Experts are found by their recorded content hash (beside SRC
    or at the recorded path) and checked again after copying; OUT is written to a temp dir,
    then renamed. Refused when OUT exists or an expert is missing or changed.

    Examples:

        lorafleet mole bundle runs/mole -o runs/mole-bundled

        lorafleet serve --base default --adapters runs/served   # runs/served/mole-bundled
    """
    from lorafleet.compose.mole_bundle import bundle_mole

    bundle_mole(src, out)
    typer.echo(f"wrote {out}")
