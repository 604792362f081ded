"""`lorafleet transfer prepare | run`: Trans-LoRA, an adapter moved to a new base, no task data."""

from __future__ import annotations

import operator

import typer

from lorafleet.cli.app import app
from lorafleet.cli.common import print_report
from lorafleet.cli.options import (
    BaseField,
    from_field,
    no_chat_option,
    options_from,
    with_options,
)
from lorafleet.transfer.config import PrepareConfig, RunConfig

transfer_app = typer.Typer(
    help="Trans-LoRA: move a task adapter to another base model with no task data.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(transfer_app, name="transfer")


# `lorafleet transfer prepare`: PrepareConfig's fields (each default is the field's).
PREPARE_OPTIONS = options_from(
    PrepareConfig,
    BaseField,
    from_field("adapter", "--adapter", "-a", help="The source adapter (PEFT dir)."),
    from_field(
        "data",
        "--data",
        "-d",
        help="The task: a built-in task, or a text/label or prompt/completion file (read now; "
        "the kit keeps only the seeds).",
    ),
    from_field("out", "--out", "-o", help="The kit directory to write."),
    from_field("seeds", help="Seed rows kept in the kit."),
    from_field(
        "real",
        help="Real inputs the discriminator trains on, and as many synthetic ones (at least "
        "128; fewer is refused).",
    ),
    from_field(
        "held_out",
        help="More inputs of each class (real, synthetic), never trained on: the reported "
        "held-out accuracy.",
    ),
    from_field("disc_steps", min=1, help="Discriminator training steps."),
    from_field("disc_rank", min=1),
    from_field("disc_lr", min=0.0),
    from_field("batch_size", min=1),
    from_field("temperature", min=0.0),
    from_field("max_new_tokens", min=1, help="Per synthetic input."),
    from_field("overwrite", help="Replace an existing --out."),
    no_chat_option(help="Plain prompts, no chat template."),
    "seed",
)

# `lorafleet transfer run`: RunConfig's fields.
RUN_OPTIONS = options_from(
    RunConfig,
    from_field("kit", "--kit", "-k", help="A kit from `transfer prepare`."),
    from_field(
        "target_base",
        "--target-base",
        "-t",
        help="The new base: gemma-270m, a model dir, .gguf or hub id.",
    ),
    from_field(
        "synthetic",
        "--synthetic",
        "-n",
        help="K: the rows the target LoRA trains on. With the filter, candidates are drawn and "
        "judged until K pass (Trans-LoRA's rejection sampling); --no-filter: the first K.",
    ),
    from_field(
        "max_candidates",
        help="Cap on candidates drawn while rejection sampling (default 10 x K); when it is "
        "hit, the run keeps the fewer that passed and says so (note in the report).",
    ),
    from_field(
        "out", "--out", "-o", help="Run dir: *.jsonl per stage, state.json, train/, adapter/."
    ),
    from_field("source_base", help="Where the source base is now (default: the kit's name)."),
    from_field("source_adapter", help="Where the source adapter is now (hash checked)."),
    from_field(
        "filter",
        "--no-filter",
        name="no_filter",
        annotation=bool,
        to_cli=operator.not_,
        to_config=operator.not_,
        help="No discriminator: the first K candidates (the ablation).",
    ),
    from_field("threshold", min=0.0, max=1.0, help="A candidate passes when P(real) >= this."),
    from_field("steps", min=1, help="Target LoRA training steps."),
    from_field("rank", "--rank", "-r", min=1),
    "alpha",
    from_field("lr", min=0.0),
    from_field("batch_size", min=1),
    from_field("temperature", min=0.0),
    from_field("max_new_tokens", min=1, help="Per candidate input."),
    from_field("label_tokens", min=1, help="Per teacher reply (generation tasks)."),
    from_field(
        "chat",
        "--no-chat",
        name="no_chat",
        annotation=bool,
        to_cli=lambda chat: chat is False,
        to_config=lambda no_chat: False if no_chat else None,
        help="Train the target on plain prompts (no chat template); default: as the kit.",
    ),
    from_field(
        "candidates",
        help="Reuse another run's generated.jsonl, in its order (e.g. the filtered run's, for "
        "--no-filter: the same first candidates).",
    ),
    "seed",
)


@transfer_app.command("prepare")
@with_options(options=PREPARE_OPTIONS)
def prepare_cmd(options: dict):
    """While the task data exists: keep a few seed rows, have the source base generate
    synthetic inputs from them (few-shot, sampled, de-duplicated, batched in the engine), train
    a discriminator LoRA on the source base on --real real + --real synthetic inputs, report
    its accuracy on --held-out more of each that it did not train on, and write the kit:
    KIT/kit.json (source base fingerprint, source adapter path + sha256), KIT/seeds.jsonl,
    KIT/discriminator/.

    Examples:

        lorafleet transfer prepare -b default -a runs/sst2 -d sst2 -o kits/sst2

        lorafleet transfer prepare -b default -a runs/clutrr -d clutrr --seeds 8 --real 256
        --disc-steps 120 -o kits/clutrr
    """
    from lorafleet.transfer import prepare

    report = prepare(PREPARE_OPTIONS.build(options))
    examples = report.pop("synthetic_examples")
    print_report({"transfer prepare": report})
    for text in examples:
        typer.echo(f"  synthetic: {' '.join(text.split())[:120]}")
    typer.echo(f"wrote kit {options['out']}")


@transfer_app.command("run")
@with_options(options=RUN_OPTIONS)
def run_cmd(options: dict):
    """Without the task data: the target base, prompted with the kit's seeds, generates
    candidate inputs (engine batches, progress + tokens/s) and the discriminator judges them
    until K pass (rejection sampling, capped by --max-candidates; accept rate and candidates
    drawn reported); the teacher (source base + source adapter) labels the K (for choice
    tasks its answer among the labels); a LoRA on the target base learns from (input, teacher
    output) and is written to DIR/adapter as a PEFT adapter with the transfer recipe in its
    metadata. Each stage is saved (DIR/generated.jsonl: every candidate with its P(real),
    filtered.jsonl, labelled.jsonl); rerunning the same command resumes after the last
    finished stage.

    Examples:

        lorafleet transfer run -k kits/sst2 -t gemma-270m -n 500 -o runs/sst2-gemma

        lorafleet transfer run -k kits/sst2 -t gemma-270m -n 500 --no-filter -o runs/sst2-nofilt
        --candidates runs/sst2-gemma/generated.jsonl

        lorafleet eval -b gemma-270m -a runs/sst2-gemma/adapter -d sst2 --limit 200
    """
    from lorafleet.transfer import run_transfer

    report = run_transfer(RUN_OPTIONS.build(options))
    flat = {"out": report["out"]}
    for stage in ("generate", "filter", "label", "train"):
        for key, value in (report.get(stage) or {}).items():
            if key not in ("adapter", "note"):
                flat[f"{stage}.{key}"] = value
    print_report({"transfer run": flat})
    note = (report.get("filter") or {}).get("note")
    if note:
        typer.echo(f"warning: {note}", err=True)
    typer.echo(f"wrote adapter {report['adapter']}")
