"""`lorafleet change train | apply | eval | examples`: LoRA of Change, edit an image the way a
before/after example shows."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.app import app

change_app = typer.Typer(
    help="LoRA of Change: a hypernetwork turns a before/after pair into a LoRA for a small "
    "image editor, which then edits a new image the same way.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(change_app, name="change")


@change_app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    steps: int = typer.Option(1500, "--steps", "-S", help="Hypernetwork training steps."),
    editor_steps: int = typer.Option(500, "--editor-steps", help="Editor pre-training steps."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, crops and edits."),
    rank: int = typer.Option(4, "--rank", "-r", help="Rank of the emitted LoRAs."),
    batch: int = typer.Option(16, "--batch", help="Pairs per step."),
    lr: float = typer.Option(5e-4, "--lr", help="Hypernetwork learning rate."),
    width: int = typer.Option(12, "--width", help="Editor U-Net base channels."),
    image_size: int = typer.Option(32, "--image-size", help="Training crop side (px)."),
    no_reverse: bool = typer.Option(
        False, "--no-reverse", help="Ablation: forward pair loss only, no LoRA Reverse term."
    ),
    quad_weight: float = typer.Option(
        0.0, "--quad-weight", help="Add the quad loss |G(H(A,A'),B) - B'| with this weight."
    ),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Steps per checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue from DIR/checkpoint/."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Train a LoC model on crops of the photos bundled with scikit-image / scikit-learn:
    first the editor G learns to reproduce its input, then G is frozen and the hypernetwork H
    learns from before/after pairs with the forward loss `|G(H(A,A'), A) - A'|` and LoRA
    Reverse `|G(-H(A,A'), A') - A|`. Held-out photos, edit types and parameter ranges are
    never seen. Checkpoints go to DIR/checkpoint/ (`--resume` continues there).

    Examples:

        lorafleet change train --out runs/loc

        lorafleet change train --out runs/loc-norev --no-reverse --seed 0

        lorafleet change train --out runs/tiny --steps 50 --editor-steps 50 --width 4

        lorafleet change train --out runs/loc --resume
    """
    from lorafleet.change.run import train_model
    from lorafleet.change.store import ChangeConfig

    if min(steps, editor_steps, rank, batch, width, checkpoint_every) < 1 or image_size % 8:
        raise typer.BadParameter(
            "steps, ranks and sizes must be >= 1; --image-size a multiple of 8"
        )
    cfg = ChangeConfig(
        seed=seed,
        image_size=image_size,
        width=width,
        rank=rank,
        editor_steps=editor_steps,
        steps=steps,
        batch=batch,
        lr=lr,
        reverse=not no_reverse,
        quad_weight=quad_weight,
        checkpoint_every=checkpoint_every,
    )
    folder = train_model(cfg, out, resume=resume, quiet=quiet)
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
        ..., "--model", "-m", help="LABEL=DIR (or DIR) of a trained model; repeatable."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Writes results.json and grid.png here."),
    per_edit: int = typer.Option(8, "--per-edit", help="Held-out quads per edit."),
    seed: int = typer.Option(0, "--seed", help="Seed for the held-out quads."),
):
    """Score LoC models on held-out photos: PSNR / SSIM of G(H(A,A'), B) against the true B',
    for seen and unseen edits, beside the frozen editor alone (G(B), its reconstruction floor)
    and the identity (B), copy (A') and pixel-difference (B + A' - A) baselines.
    Writes DIR/results.json and a picture grid DIR/grid.png (rows:
    edits; columns: A, A', B, true B', each model, the baselines).

    Examples:

        lorafleet change eval -m loc=runs/loc -m no-reverse=runs/loc-norev --out runs/loc-eval

        lorafleet change eval -m runs/loc --per-edit 2 --out /tmp/quick
    """
    from lorafleet.change.run import evaluate_models, results_table

    if per_edit < 1:
        raise typer.BadParameter("--per-edit must be >= 1")
    models = {}
    for spec in model:
        label, _, folder = spec.rpartition("=")
        models[label or Path(folder).name] = Path(folder)
    results = evaluate_models(models, out, per_edit=per_edit, seed=seed)
    typer.echo("PSNR (dB) / SSIM on held-out photos\n" + results_table(results))
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
