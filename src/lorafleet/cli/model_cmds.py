"""`lorafleet info` and `lorafleet generate`: look at a base model and an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.common import load_model, print_report
from lorafleet.cli.options import (
    DEVICE_OPTIONS,
    AdapterOpt,
    BaseOpt,
    DtypeOpt,
    FedDirOpt,
    ForceOpt,
    HubAdaptersOpt,
    MaskOpt,
    MaxRankOpt,
    MoleDirOpt,
    with_options,
)


@app.command()
def info(
    base: str = BaseOpt,
    adapter: Path | None = AdapterOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    force: bool = ForceOpt,
    max_rank: int = MaxRankOpt,
    hub_adapters: bool = HubAdaptersOpt,
):
    """Describe a base model (family, size, targetable layers) and optionally an adapter.

    Examples:

        lorafleet info --base default

        lorafleet info --base default --adapter runs/sst2 --json

        lorafleet info --base default --hub-adapters --adapter my-org/sst2-lora@v1
    """
    from lorafleet.adapters import describe_adapter
    from lorafleet.models import describe_model

    loaded, adapter_obj, _ = load_model(base, adapter, force, max_rank, hub_adapters=hub_adapters)
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
    print_report(report)


@app.command()
@with_options(hardware=DEVICE_OPTIONS)
def generate(
    *,
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
    fed: Path | None = FedDirOpt,
    mole: Path | None = MoleDirOpt,
    mask: list[str] = MaskOpt,
    dtype: str = DtypeOpt,
    hub_adapters: bool = HubAdaptersOpt,
    hardware: dict,
):
    """Generate a reply (greedy by default) and print only the generated text.

    Examples:

        lorafleet generate --base default --prompt "What is the capital of France?"

        lorafleet generate --base default --adapter runs/sst2 --prompt "Great film!" --max-tokens 8

        lorafleet generate --base default --fed runs/fed --prompt "Great film!" --max-tokens 8

        lorafleet generate --base default --mole runs/mole --mask clutrr --prompt "Great film!"

        lorafleet generate --base default --dtype bfloat16 --prompt "What is 2 + 2?"

        lorafleet generate --base default --device cuda --prompt "What is 2 + 2?"
    """
    from lorafleet.models.generation import generate_text

    loaded, _, model = load_model(
        base,
        adapter,
        force,
        max_rank,
        fed,
        mole,
        mask,
        dtype,
        hub_adapters=hub_adapters,
        device=DEVICE_OPTIONS.build(hardware).device,
    )
    text = generate_text(
        model,
        loaded.tokenizer,
        prompt,
        max_tokens=max_tokens,
        chat=not no_chat,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    typer.echo(text)
