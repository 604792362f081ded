"""`lorafleet train` and `lorafleet eval`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from lorafleet.adapters.methods import cli_help as method_help
from lorafleet.cli.app import app
from lorafleet.cli.bayes_cmds import eval_bayes
from lorafleet.cli.common import load_model, print_report, write_json
from lorafleet.cli.options import (
    DEVICE_HELP,
    DEVICE_OPTIONS,
    NO_CHAT_HELP,
    AdapterOpt,
    BaseField,
    BaseOpt,
    DtypeOpt,
    FedDirOpt,
    ForceOpt,
    HubAdaptersOpt,
    MaskOpt,
    MaxRankOpt,
    MoleDirOpt,
    from_field,
    no_chat_option,
    options_from,
    repeated_option,
    targets_option,
    with_options,
)
from lorafleet.eval.config import METRICS, EvalConfig
from lorafleet.train.bilora_config import BiLoRAConfig
from lorafleet.train.config import DEFAULT_STEPS, TrainConfig

# `lorafleet train`: one option per TrainConfig field it sets (BiLoRA's ride in its `extra`).
TRAIN_OPTIONS = options_from(
    TrainConfig,
    BaseField,
    from_field(
        "data",
        "--data",
        "-d",
        help="A built-in task (sst2, clutrr, strategyqa, gsm8k) or a .jsonl/.csv/.tsv/.parquet.",
    ),
    from_field(
        "out",
        "--out",
        "-o",
        help="Run directory: adapter, metrics.jsonl, loss.png, checkpoints/.",
    ),
    from_field("val", help="Validation data (default: a built-in task's validation split)."),
    from_field("method", help=method_help()),
    from_field("rank", "--rank", "-r"),
    "alpha",
    targets_option("all-linear, or a list like q_proj,v_proj"),
    "dropout",
    from_field("steps", help=f"Optimizer steps (default {DEFAULT_STEPS} unless --epochs)."),
    "epochs",
    "lr",
    "weight_decay",
    from_field("warmup", help="Warmup as a fraction of the steps."),
    from_field("batch_size", help="Per process and micro-step."),
    "grad_accum",
    from_field("max_grad_norm", help="0 turns clipping off."),
    "max_length",
    from_field("on_overflow", help="truncate (prompt, from the left) | drop"),
    "packing",
    "seed",
    from_field("dtype", help="fp32 | bf16 (autocast)"),
    "gradient_checkpointing",
    from_field("eval_every", help="Validate every N steps (0: at the end)."),
    from_field("eval_limit", help="Validation rows used."),
    repeated_option(
        "val_metrics", "--val-metric", name="val_metric", help="Validation metric; repeatable."
    ),
    from_field("train_limit", help="Use only the first N rows."),
    from_field("save_every", help="Checkpoint every N steps."),
    "keep_checkpoints",
    no_chat_option(help=NO_CHAT_HELP),
    from_field("resume", help="Continue from the newest checkpoint in --out."),
    from_field(
        "device",
        help=DEVICE_HELP + " Under torchrun, cuda is each process's LOCAL_RANK GPU.",
    ),
)
# `lorafleet eval`: how it scores (EvalConfig).
EVAL_OPTIONS = options_from(
    EvalConfig,
    repeated_option(
        "metrics",
        "--metric",
        "-m",
        name="metric",
        help=f"{' | '.join(METRICS)}; repeatable (default: the task's).",
    ),
    from_field("batch_size", min=1),
    from_field("max_new_tokens", min=1),
    from_field("max_length", min=8),
)


@app.command()
@with_options(run=TRAIN_OPTIONS)
def train(
    run: dict,
    bilevel: str | None = typer.Option(
        None, "--bilevel", help="bilora: first (default) | second (unrolled) | joint (control)."
    ),
    bilevel_split: float | None = typer.Option(
        None,
        "--bilevel-split",
        help=f"bilora: fraction of the data in D1 (default {BiLoRAConfig.bilevel_split}).",
    ),
    ortho_weight: float | None = typer.Option(
        None,
        "--ortho-weight",
        help=f"bilora: weight of ||P'P - I||^2 + ||QQ' - I||^2 ({BiLoRAConfig.ortho_weight}).",
    ),
    lambda_lr: float | None = typer.Option(
        None,
        "--lambda-lr",
        help=f"bilora: lambda's own Adam lr (default {BiLoRAConfig.lambda_lr}; P, Q use --lr).",
    ),
    warm_start: int | None = typer.Option(
        None,
        "--warm-start",
        help=f"bilora: joint steps on D1 before alternating (default {BiLoRAConfig.warm_start}).",
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
    from lorafleet.train import trainer_for
    from lorafleet.train.bilora_config import bilora_options

    extra = bilora_options(
        run["method"], bilevel, bilevel_split, ortho_weight, lambda_lr, warm_start
    )
    cfg = TRAIN_OPTIONS.build(run, extra=extra)
    trainer = trainer_for(cfg)
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
    typer.echo(f"adapter written to {cfg.out}" + (f" (validation: {shown})" if shown else ""))
    return 0


@app.command("eval")
@with_options(scoring=EVAL_OPTIONS, hardware=DEVICE_OPTIONS)
def eval_cmd(
    *,
    base: str = BaseOpt,
    data: str = typer.Option(..., "--data", "-d", help="A built-in task or a data file."),
    adapter: Path | None = AdapterOpt,
    split: str = typer.Option("validation", "--split", help="train | validation (built-in tasks)."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate the first N rows only."),
    scoring: dict,
    hardware: dict,
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
    hub_adapters: bool = HubAdaptersOpt,
):
    """Evaluate the base model or an adapter: task metric, loss and perplexity.

    Examples:

        lorafleet eval --base default --data sst2 --limit 500

        lorafleet eval --base default --adapter runs/clutrr --data clutrr --json clutrr.json

        lorafleet eval -b default -a runs/sst2 --data sst2 --bayes --json sst2-calibration.json

        lorafleet eval --base default --fed runs/fed --data sst2 --limit 500

        lorafleet eval --base default --mole runs/mole --data sst2 --mask clutrr

        lorafleet eval --base default --data sst2 --limit 200 --dtype bfloat16

        lorafleet eval --base default --adapter runs/sst2 --data sst2 --device cuda

        lorafleet eval --base default --hub-adapters -a my-org/sst2-lora@v1 --data sst2
    """
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate

    cfg = EVAL_OPTIONS.build(scoring)  # a bad --metric fails before the model loads
    device = DEVICE_OPTIONS.build(hardware).device  # so do a bad --device and cuda without GPU
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
        device=device,
    )
    examples = load_examples(data, loaded.tokenizer, split=split, chat=not no_chat, limit=limit)
    if bayes:  # accuracy, ECE, NLL, Brier for MAP vs Laplace, reliability diagram, JSON
        return eval_bayes(
            model,
            loaded.tokenizer,
            adapter,
            examples,
            json_out=json_out,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
        )
    figures = evaluate(
        model, loaded.tokenizer, examples, **dataclasses.asdict(cfg), show_progress=True
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
