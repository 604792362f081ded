"""`lorafleet merge`: combine adapters exactly, or fold them into the base (merged export)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.common import print_report
from lorafleet.cli.options import BaseOpt, ForceOpt, HubAdaptersOpt, SeedOpt


@app.command()
def merge(
    base: str = BaseOpt,
    adapter: list[str] = typer.Option(
        ..., "--adapter", "-a", help="NAME=DIR[:WEIGHT] (weight 1 if left out; negative negates)."
    ),
    method: str = typer.Option(
        "linear",
        "--method",
        "-m",
        help="linear | cat | svd | ties | dare_linear | dare_ties | magnitude_prune",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter dir (or model dir, --into-base)."),
    into_base: bool = typer.Option(
        False, "--into-base", help="Write a full transformers model with the merge folded in."
    ),
    density: float = typer.Option(
        0.5, "--density", help="Fraction kept by ties / dare_* / magnitude_prune, in (0, 1]."
    ),
    majority_sign: str = typer.Option(
        "total", "--majority-sign", help="TIES sign election: total | frequency."
    ),
    rank: int | None = typer.Option(
        None,
        "--rank",
        "-r",
        min=1,
        help="Output rank of svd (default: the largest input rank) and of ties / dare_* / "
        "magnitude_prune (default: the sum of input ranks); the error is reported.",
    ),
    seed: int = SeedOpt,
    force: bool = ForceOpt,
    hub_adapters: bool = HubAdaptersOpt,
):
    """Merge adapters into one PEFT adapter: exact for linear and cat (any ranks, alphas,
    rsLoRA, rank patterns and target sets), svd truncates the exact delta to --rank, TIES / DARE
    work on the dense deltas. With --into-base, write the base with the merge folded in.

    Examples:

        lorafleet merge --base default -a sst2=runs/sst2:0.5 -a clutrr=runs/clutrr:0.5 --out merged

        lorafleet merge --base default -a a=A -a b=B --method ties --density 0.3 --out merged

        lorafleet merge --base default -a runs/sst2/adapter --into-base --out sst2-model

        lorafleet merge --base default --hub-adapters -a a=my-org/sst2-lora@v1 -a b=B --out m
    """
    from lorafleet.compose.run import run_merge

    summary = run_merge(
        base,
        adapter,
        method,
        out,
        into_base=into_base,
        density=density,
        majority_sign=majority_sign,
        seed=seed,
        rank=rank,
        force=force,
        hub_adapters=hub_adapters,
    )
    adapters = summary.pop("adapters")
    summary["adapters"] = [f"{a['name']} x{a['weight']:g}" for a in adapters]
    print_report({"merge": summary})
    typer.echo(f"wrote {summary.get('model_dir') or summary['adapter']}")
