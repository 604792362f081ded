"""`lorafleet change train | apply | eval | examples`: LoRA of Change, edit an image the way a
before/after example shows."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.change.config import ChangeConfig
from lorafleet.cli.app import app
from lorafleet.cli.options import from_field, options_from, with_options

change_app = typer.Typer(
    help="LoRA of Change: a hypernetwork turns a before/after pair into a LoRA for a small "
    "image editor, which then edits a new image the same way.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(change_app, name="change")


# `lorafleet change train`: the fields of ChangeConfig (each default read from the field).
TRAIN_OPTIONS = options_from(
    ChangeConfig,
    from_field("steps", "--steps", "-S", help="Hypernetwork training steps."),
    from_field("editor_steps", help="Pre-training steps of the editor's U-Net (0: none)."),
    from_field("seed", help="Seed for weights, crops and edits."),
    from_field("rank", "--rank", "-r", help="Rank of the emitted LoRAs."),
    from_field("batch", help="Pairs per step."),
    from_field("lr", help="Hypernetwork learning rate."),
    from_field("width", help="Editor U-Net base channels."),
    from_field("image_size", help="Training crop side (px), a multiple of 8."),
    from_field(
        "editor",
        help="residual: G(x) = x + f(x), f's last conv zeroed after pre-training, so G alone is "
        "the identity | plain: G(x) = f(x) trained to copy its input (issue 18).",
    ),
    from_field(
        "query",
        help="flip: query/target are the horizontally flipped pair (the paper's) where the edit "
        "commutes with a flip, else the pair itself | flip-all: always flipped (the paper's "
        "form) | pair: never.",
    ),
    from_field(
        "exchange", help="Probability of training on <A', A> (the reverse edit) instead of <A, A'>."
    ),
    from_field(
        "reverse",
        "--reverse/--no-reverse",
        help="LoRA Reverse |G(-H(A,A'), Q') - Q| (--no-reverse: the ablation).",
    ),
    from_field(
        "reverse_scope",
        help="Pairs that get Reverse and the exchange: invertible (edits that can be undone; "
        "not grayscale, posterize, blur, edges, emboss, pixelate) | all (the paper's form).",
    ),
    from_field("quad_weight", help="Add the quad loss |G(H(A,A'),B) - B'| with this weight."),
    from_field("checkpoint_every", help="Steps per checkpoint."),
)


@change_app.command()
@with_options(config=TRAIN_OPTIONS)
def train(
    *,
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    config: dict,
    resume: bool = typer.Option(False, "--resume", help="Continue from DIR/checkpoint/."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Train a LoC model on crops of the photos bundled with scikit-image / scikit-learn:
    first the editor's U-Net f learns to reproduce its input (the residual editor G = x + f
    then has f's last conv zeroed: G alone is the identity), then G is frozen and the
    hypernetwork H learns from before/after pairs as the paper trains on pairs only: random
    exchange of <A, A'>, the flipped pair as query Q and target Q', the forward loss
    `|G(H(A,A'), Q) - Q'|` and LoRA Reverse `|G(-H(A,A'), Q') - Q|` (on invertible edits).
    Held-out photos, edit types and parameter ranges are never seen. Checkpoints go to
    DIR/checkpoint/ (`--resume` continues there).

    Examples:

        lorafleet change train --out runs/loc

        lorafleet change train --out runs/loc-norev --no-reverse --seed 0

        lorafleet change train --out runs/loc-paper --query flip-all --reverse-scope all

        lorafleet change train --out runs/tiny --steps 50 --editor-steps 50 --width 4

        lorafleet change train --out runs/loc --resume
    """
    from lorafleet.change.run import train_model

    folder = train_model(TRAIN_OPTIONS.build(config), out, resume=resume, quiet=quiet)
    typer.echo(f"LoC model written to {folder}")


@change_app.command()
def apply(
    model: Path = typer.Option(..., "--model", "-m", help="A `lorafleet change train` dir."),
    image: Path = typer.Option(..., "--image", "--input", help="The PNG to edit (B)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the edited PNG (B')."),
    before: Path = typer.Option(
        None, "--before", "--example-before", help="Example pair: the PNG before the edit (A)."
    ),
    after: Path = typer.Option(
        None, "--after", "--example-after", help="Example pair: the PNG after the edit (A')."
    ),
    lora: Path = typer.Option(None, "--lora", help="Reuse a LoRA saved by --save-lora."),
    save_lora: Path = typer.Option(
        None, "--save-lora", help="Also write the emitted LoRA here (PEFT format)."
    ),
):
    """Edit an image the way an example pair shows: B' = G(H(A, A'), B).

    The example pair is resized to the model's training size (32 px by default); the image to
    edit keeps its own size (any side from 8 to 2048 px): the editor is fully convolutional.
    PNG in, PNG out. `--save-lora` keeps the emitted adapter (a PEFT LoRA of the editor's
    convolutions); `--lora` applies a saved one without an example pair.

    Examples:

        lorafleet change examples --out ex --edit hue

        lorafleet change apply -m runs/loc --before ex/before.png --after ex/after.png \\
            --image ex/image.png --out ex/edited.png

        lorafleet change apply -m runs/loc --example-before A.png --example-after A2.png \\
            --input B.png --out B2.png --save-lora loras/warm

        lorafleet change apply -m runs/loc --lora loras/warm --image C.png --out C2.png
    """
    from lorafleet.change.run import apply_change

    info = apply_change(model, image, out, before, after, lora, save_lora)
    extra = f"; LoRA in {save_lora}" if save_lora else ""
    typer.echo(f"edited {image} -> {info['out']}{extra}")


@change_app.command("eval")
def evaluate(
    model: list[str] = typer.Option(
        ...,
        "--model",
        "-m",
        help="LABEL=DIR (or DIR) of a trained model; repeatable; a label given again adds a "
        "seed of that model.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Writes results.json and grid.png here."),
    per_edit: int = typer.Option(8, "--per-edit", min=1, help="Held-out quads per edit."),
    seed: int = typer.Option(0, "--seed", help="Seed for the held-out quads."),
):
    """Score LoC models on held-out photos: PSNR / SSIM of G(H(A,A'), B) against the true B',
    per edit family (colour/tone, filter, geometry) for seen edits, held-out edit types and
    held-out parameter ranges, beside the frozen editor alone (G(B)) and the identity (B),
    copy (A') and pixel-difference (B + A' - A) baselines, with each model's paired
    differences and bootstrap intervals. Writes DIR/results.json and a picture grid
    DIR/grid.png (rows: edits; columns: A, A', B, true B', each model, the baselines).

    Examples:

        lorafleet change eval -m LoC=runs/loc-s0 -m LoC=runs/loc-s1 --out runs/loc-eval

        lorafleet change eval -m runs/loc --per-edit 2 --out /tmp/quick
    """
    from lorafleet.change.run import diffs_table, evaluate_models, results_table

    models = []
    for spec in model:
        label, _, folder = spec.rpartition("=")
        models.append((label or Path(folder).name, Path(folder)))
    results = evaluate_models(models, out, per_edit=per_edit, seed=seed)
    typer.echo("PSNR (dB) on held-out photos\n" + results_table(results))
    typer.echo("\nPSNR differences (dB) [95% bootstrap interval]\n" + diffs_table(results))
    typer.echo(f"written {out}/results.json and {out}/grid.png")


@change_app.command()
def examples(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs."),
    edit: str = typer.Option("hue", "--edit", help="Edit type (see --help of eval)."),
    unseen: bool = typer.Option(False, "--unseen", help="Use the held-out parameter range."),
    seed: int = typer.Option(0, "--seed", help="Seed for the edit's parameters."),
):
    """Write an example pair (before.png, after.png), an image to edit (image.png) and the true
    answer (truth.png), all cut from held-out photos, to try `lorafleet change apply` on.

    Examples:

        lorafleet change examples --out ex --edit tint

        lorafleet change examples --out ex --edit posterize --unseen
    """
    from lorafleet.change.edits import OPS
    from lorafleet.change.run import write_examples

    if edit not in OPS:
        raise typer.BadParameter(f"unknown edit {edit!r}; one of {', '.join(OPS)}")
    info = write_examples(out, edit, unseen, seed)
    typer.echo(f"{info['edit']}: " + ", ".join(info["files"]))
