"""`lorafleet transfer prepare | run`: Trans-LoRA, an adapter moved to a new base, no task data."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.common import print_report
from lorafleet.cli.options import BaseOpt, NoChatOpt, SeedOpt

transfer_app = typer.Typer(
    help="Trans-LoRA: move a task adapter to another base model with no task data.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(transfer_app, name="transfer")


@transfer_app.command("prepare")
def prepare_cmd(
    base: str = BaseOpt,
    adapter: Path = typer.Option(..., "--adapter", "-a", help="The source adapter (PEFT dir)."),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="The task: a built-in task, or a text/label or "
        "prompt/completion file (read now; the kit keeps only the seeds).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The kit directory to write."),
    seeds: int = typer.Option(5, "--seeds", help="Seed rows kept in the kit."),
    real: int = typer.Option(
        64, "--real", help="Real inputs the discriminator learns from (as many synthetic)."
    ),
    disc_steps: int = typer.Option(60, "--disc-steps", min=1, help="Discriminator steps."),
    disc_rank: int = typer.Option(8, "--disc-rank", min=1),
    disc_lr: float = typer.Option(1e-3, "--disc-lr", min=0.0),
    held_out: float = typer.Option(
        0.25, "--held-out", help="Fraction of each class held out for the reported accuracy."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    temperature: float = typer.Option(0.9, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1, help="Per input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    no_chat: bool = NoChatOpt,
    seed: int = SeedOpt,
):
    """While the task data exists: keep a few seed rows, have the source base generate
    synthetic inputs from them (few-shot, sampled, de-duplicated, batched in the engine), train
    a discriminator LoRA on the source base to tell real inputs from synthetic ones (its
    held-out accuracy is reported), and write the kit: KIT/kit.json (source base fingerprint,
    source adapter path + sha256), KIT/seeds.jsonl, KIT/discriminator/.

    Examples:

        lorafleet transfer prepare -b default -a runs/sst2 -d sst2 -o kits/sst2

        lorafleet transfer prepare -b default -a runs/clutrr -d clutrr --seeds 8 --real 128
        --disc-steps 120 -o kits/clutrr
    """
    from lorafleet.transfer import PrepareConfig, prepare

    cfg = PrepareConfig(
        base=base,
        adapter=adapter,
        data=data,
        out=out,
        seeds=seeds,
        real=real,
        disc_steps=disc_steps,
        disc_rank=disc_rank,
        disc_lr=disc_lr,
        batch_size=batch_size,
        held_out=held_out,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        chat=not no_chat,
        seed=seed,
        overwrite=overwrite,
    )
    report = prepare(cfg)
    examples = report.pop("synthetic_examples")
    print_report({"transfer prepare": report})
    for text in examples:
        typer.echo(f"  synthetic: {' '.join(text.split())[:120]}")
    typer.echo(f"wrote kit {out}")


@transfer_app.command("run")
def run_cmd(
    kit: Path = typer.Option(..., "--kit", "-k", help="A kit from `transfer prepare`."),
    target_base: str = typer.Option(
        ..., "--target-base", "-t", help="The new base: gemma-270m, a model dir, .gguf or hub id."
    ),
    synthetic: int = typer.Option(
        ..., "--synthetic", "-n", help="Candidate inputs the target base generates."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run dir: *.jsonl per stage, state.json, train/, adapter/."
    ),
    source_base: str | None = typer.Option(
        None, "--source-base", help="Where the source base is now (default: the kit's name)."
    ),
    source_adapter: Path | None = typer.Option(
        None, "--source-adapter", help="Where the source adapter is now (hash checked)."
    ),
    no_filter: bool = typer.Option(
        False, "--no-filter", help="Keep every candidate (the ablation)."
    ),
    threshold: float = typer.Option(0.5, "--threshold", help="Keep when P(real) >= this."),
    steps: int = typer.Option(100, "--steps", help="Target LoRA training steps."),
    rank: int = typer.Option(8, "--rank", "-r"),
    alpha: float = typer.Option(16.0, "--alpha"),
    lr: float = typer.Option(1e-3, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    temperature: float = typer.Option(0.9, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1, help="Per input."),
    label_tokens: int = typer.Option(
        64, "--label-tokens", min=1, help="Per teacher reply (generation tasks)."
    ),
    no_chat: bool = typer.Option(
        False, "--no-chat", help="Train the target on plain prompts (no chat template)."
    ),
    candidates: Path | None = typer.Option(
        None, "--candidates", help="Reuse another run's generated.jsonl (e.g. for --no-filter)."
    ),
    seed: int = SeedOpt,
):
    """Without the task data: the target base, prompted with the kit's seeds, generates N
    candidate inputs (engine batches, progress + tokens/s); the discriminator keeps those it
    judges real (accept rate reported); the teacher (source base + source adapter) labels them
    (for choice tasks its answer among the labels); a LoRA on the target base learns from
    (input, teacher output) and is written to DIR/adapter as a PEFT adapter with the transfer
    recipe in its metadata. Each stage is saved (DIR/generated.jsonl, filtered.jsonl,
    labelled.jsonl); rerunning the same command resumes after the last finished stage.

    Examples:

        lorafleet transfer run -k kits/sst2 -t gemma-270m -n 500 -o runs/sst2-gemma

        lorafleet transfer run -k kits/sst2 -t gemma-270m -n 500 --no-filter -o runs/sst2-nofilt
        --candidates runs/sst2-gemma/generated.jsonl

        lorafleet eval -b gemma-270m -a runs/sst2-gemma/adapter -d sst2 --limit 200
    """
    from lorafleet.transfer import RunConfig, run_transfer

    cfg = RunConfig(
        kit=kit,
        target_base=target_base,
        synthetic=synthetic,
        out=out,
        source_base=source_base,
        source_adapter=source_adapter,
        filter=not no_filter,
        threshold=threshold,
        chat=False if no_chat else None,
        steps=steps,
        rank=rank,
        alpha=alpha,
        lr=lr,
        batch_size=batch_size,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        label_tokens=label_tokens,
        seed=seed,
        candidates=candidates,
    )
    report = run_transfer(cfg)
    flat = {"out": report["out"]}
    for stage in ("generate", "filter", "label", "train"):
        for key, value in (report.get(stage) or {}).items():
            if key != "adapter":
                flat[f"{stage}.{key}"] = value
    print_report({"transfer run": flat})
    typer.echo(f"wrote adapter {report['adapter']}")
