"""`lorafleet train` and `lorafleet eval`."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.bayes_cmds import eval_bayes
from lorafleet.cli.common import load_model, print_report, write_json
from lorafleet.cli.options import (
    AdapterOpt,
    BaseOpt,
    DtypeOpt,
    FedDirOpt,
    ForceOpt,
    MaskOpt,
    MaxRankOpt,
    MoleDirOpt,
    NoChatOpt,
    SeedOpt,
)


@app.command()
def train(
    base: str = BaseOpt,
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="A built-in task (sst2, clutrr, strategyqa, gsm8k) or a .jsonl/.csv/.tsv/.parquet.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run directory: adapter, metrics.jsonl, loss.png, checkpoints/."
    ),
    val: str | None = typer.Option(
        None, "--val", help="Validation data (default: a built-in task's validation split)."
    ),
    method: str = typer.Option(
        "lora", "--method", help="lora | rslora | dora | bone | bat | bilora"
    ),
    rank: int = typer.Option(16, "--rank", "-r"),
    alpha: float = typer.Option(32.0, "--alpha"),
    targets: str = typer.Option(
        "all-linear", "--targets", help="all-linear, or a list like q_proj,v_proj"
    ),
    dropout: float = typer.Option(0.0, "--dropout"),
    steps: int | None = typer.Option(
        None, "--steps", help="Optimizer steps (default 100 unless --epochs)."
    ),
    epochs: float | None = typer.Option(None, "--epochs"),
    lr: float = typer.Option(2e-4, "--lr"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    warmup: float = typer.Option(0.05, "--warmup", help="Warmup as a fraction of the steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Per process and micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="0 turns clipping off."),
    max_length: int = typer.Option(512, "--max-length"),
    on_overflow: str = typer.Option(
        "truncate", "--on-overflow", help="truncate (prompt, from the left) | drop"
    ),
    packing: bool = typer.Option(False, "--packing"),
    seed: int = SeedOpt,
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 (autocast)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    eval_every: int = typer.Option(
        0, "--eval-every", help="Validate every N steps (0: at the end)."
    ),
    eval_limit: int | None = typer.Option(200, "--eval-limit", help="Validation rows used."),
    val_metric: list[str] = typer.Option([], "--val-metric", help="Validation metric; repeatable."),
    train_limit: int | None = typer.Option(
        None, "--train-limit", help="Use only the first N rows."
    ),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints"),
    no_chat: bool = NoChatOpt,
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest checkpoint in --out."
    ),
    bilevel: str | None = typer.Option(
        None, "--bilevel", help="bilora: first (default) | second (unrolled) | joint (control)."
    ),
    bilevel_split: float | None = typer.Option(
        None, "--bilevel-split", help="bilora: fraction of the data in D1 (default 0.8)."
    ),
    ortho_weight: float | None = typer.Option(
        None, "--ortho-weight", help="bilora: weight of ||P'P - I||^2 + ||QQ' - I||^2 (0.1)."
    ),
):
    """Fine-tune an adapter. Ctrl-C or SIGTERM saves a checkpoint; --resume continues it.

    Runs data-parallel under torchrun (gloo on CPU, nccl on GPU); --batch-size is per process.

    Examples:

        lorafleet train --base default --data sst2 --steps 300 --out runs/sst2

        lorafleet train --base default --data my.jsonl --method rslora --rank 64 --out runs/x

        lorafleet train --base default --data sst2 --method bilora --bilevel second --out runs/bi

        torchrun --standalone --nproc-per-node 2 -m lorafleet.cli train -b default -d sst2 -o ddp
    """
    from lorafleet.adapters import parse_targets
    from lorafleet.train import TrainConfig, Trainer
    from lorafleet.train.bilora import BiLoRATrainer, bilora_options

    cfg = TrainConfig(
        base=base,
        data=data,
        out=out,
        val=val,
        method=method,
        rank=rank,
        alpha=alpha,
        targets=parse_targets(targets),
        dropout=dropout,
        steps=steps,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        max_length=max_length,
        on_overflow=on_overflow,
        packing=packing,
        seed=seed,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        eval_every=eval_every,
        eval_limit=eval_limit,
        val_metrics=tuple(val_metric) or None,
        train_limit=train_limit,
        save_every=save_every,
        keep_checkpoints=keep_checkpoints,
        chat=not no_chat,
        resume=resume,
        extra=bilora_options(method, bilevel, bilevel_split, ortho_weight),
    )
    trainer = BiLoRATrainer(cfg) if method == "bilora" else Trainer(cfg)
    result = trainer.run()
    if not trainer.dist.is_main:
        return 0
    if result["interrupted"]:
        typer.echo(
            f"lorafleet: stopped at step {result['steps']}/{result['total_steps']}; checkpoint "
            f"{result['checkpoint']}; continue with the same command plus --resume",
            err=True,
        )
        return 130
    val_figures = result.get("validation") or {}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in val_figures.items() if isinstance(v, float))
    typer.echo(f"adapter written to {out}" + (f" (validation: {shown})" if shown else ""))
    return 0


@app.command("eval")
def eval_cmd(
    base: str = BaseOpt,
    data: str = typer.Option(..., "--data", "-d", help="A built-in task or a data file."),
    adapter: Path | None = AdapterOpt,
    split: str = typer.Option("validation", "--split", help="train | validation (built-in tasks)."),
    metric: list[str] = typer.Option(
        [],
        "--metric",
        "-m",
        help="accuracy | exact_match | contains | perplexity; repeatable (default: the task's).",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate the first N rows only."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    max_length: int = typer.Option(1024, "--max-length", min=8),
    no_chat: bool = typer.Option(False, "--no-chat"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the figures here."),
    force: bool = ForceOpt,
    max_rank: int = MaxRankOpt,
    bayes: bool = typer.Option(
        False, "--bayes", help="MAP vs Laplace-LoRA calibration (after `lorafleet calibrate`)."
    ),
    fed: Path | None = FedDirOpt,
    mole: Path | None = MoleDirOpt,
    mask: list[str] = MaskOpt,
    dtype: str = DtypeOpt,
):
    """Evaluate the base model or an adapter: task metric, loss and perplexity.

    Examples:

        lorafleet eval --base default --data sst2 --limit 500

        lorafleet eval --base default --adapter runs/clutrr --data clutrr --json clutrr.json

        lorafleet eval -b default -a runs/sst2 --data sst2 --bayes --json sst2-calibration.json

        lorafleet eval --base default --fed runs/fed --data sst2 --limit 500

        lorafleet eval --base default --mole runs/mole --data sst2 --mask clutrr

        lorafleet eval --base default --data sst2 --limit 200 --dtype bfloat16
    """
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate

    loaded, _, model = load_model(base, adapter, force, max_rank, fed, mole, mask, dtype)
    examples = load_examples(data, loaded.tokenizer, split=split, chat=not no_chat, limit=limit)
    if bayes:  # accuracy, ECE, NLL, Brier for MAP vs Laplace, reliability diagram, JSON
        return eval_bayes(
            model,
            loaded.tokenizer,
            adapter,
            examples,
            json_out=json_out,
            batch_size=batch_size,
            max_length=max_length,
        )
    figures = evaluate(
        model,
        loaded.tokenizer,
        examples,
        metrics=tuple(metric) or None,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        show_progress=True,
    )
    report = {
        "base": base,
        "adapter": str(adapter or mole or "") or None,
        "data": data,
        "split": split,
        **figures,
    }
    print_report({"evaluation": report})
    if json_out is not None:
        write_json(json_out, report)
        typer.echo(f"wrote {json_out}")
