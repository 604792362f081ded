"""`lorafleet calibrate` (Laplace-LoRA) and the `eval --bayes` report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from lorafleet.bayes.config import FIT_ROWS, CalibrateConfig, LaplaceConfig
from lorafleet.cli.app import app
from lorafleet.cli.common import load_model, print_report, write_json
from lorafleet.cli.options import (
    BaseOpt,
    ForceOpt,
    MaxRankOpt,
    NoChatOpt,
    from_field,
    options_from,
    with_options,
)
from lorafleet.errors import LorafleetError

# How `lorafleet calibrate` fits the factors (LaplaceConfig) and tunes the prior (CalibrateConfig).
FIT_OPTIONS = options_from(
    LaplaceConfig,
    from_field("n_kfac", min=1, help="Rank kept for large Kronecker factors."),
    from_field("threshold", min=1, help="Factors larger than this are low-rank + diagonal."),
    from_field("labels", help="Fisher labels: exact (all classes) | sampled (one draw)."),
    from_field("batch_size", min=1),
    "seed",
    from_field(
        "kfac",
        help="KFAC over a weight shared by the prompt's positions: expand (every position an "
        "example, as the official Laplace-LoRA code's backend) | reduce (mean input, summed "
        "output gradient: one term per example; this project's form before).",
    ),
    from_field(
        "subset",
        help="Weights under the posterior, the official code's --laplace_sub: all (every LoRA "
        "weight; the paper's Laplace-LoRA) | last_layer (only a LoRA on lm_head, cut to the "
        "answer tokens' rows: needs an adapter that targets lm_head). A LoRA on lm_head is cut "
        "to those rows in both.",
    ),
)
TUNING_OPTIONS = options_from(
    CalibrateConfig,
    from_field("tune", help="Prior precision by: evidence (marginal likelihood) | val."),
    from_field(
        "prior",
        help="Prior on the LoRA weights: zero (N(0, 1/lam) on A and B, one lam: the paper's) | "
        "b-only (A fixed, B ~ N(0, 1/lam)) | b-layers (b-only, one lam per module) | init "
        "(centred at lora_init.safetensors) | parts (lam_A, lam_B).",
    ),
    from_field(
        "evidence",
        help="Evidence form: mode (MacKay's formula; assumes the weights were trained under "
        "this prior) | quadratic (the likelihood's quadratic approximation at the weights "
        "integrated against the prior: movement the curvature does not pin down is ignored; "
        "see docs/calibration.md).",
    ),
    from_field(
        "weight_samples", min=0, help="Also report the weight-sampling predictive on --val."
    ),
    from_field("max_length", min=8),
    from_field(
        "search",
        help="How the evidence is maximised over log lam: adam (--prior-steps Adam steps, lr "
        "0.1, from lam 1: the official code's) | grid (1e-4..1e7, then golden section: the "
        "global optimum, also beyond Adam's reach of about e^-10..e^10).",
    ),
    from_field("prior_steps", min=1, help="Adam steps of --search adam."),
)


@app.command()
@with_options(fit=FIT_OPTIONS, tuning=TUNING_OPTIONS)
def calibrate(
    *,
    base: str = BaseOpt,
    adapter: Path = typer.Option(
        ..., "--adapter", "-a", help="The LoRA adapter directory; the factors are saved in it."
    ),
    data: str = typer.Option(
        ..., "--data", "-d", help="Training data (built-in task or file) of the adapter."
    ),
    val: str | None = typer.Option(
        None, "--val", help="Validation data: figures reported, and used by --tune val."
    ),
    split: str = typer.Option("train", "--split", help="Split of --data (built-in tasks)."),
    val_split: str = typer.Option("validation", "--val-split", help="Split of --val."),
    train_limit: int = typer.Option(
        FIT_ROWS,
        "--train-limit",
        min=1,
        help="Fit on the first N rows of --data (the whole split when it has fewer; the paper "
        "fits on the whole training set).",
    ),
    val_limit: int | None = typer.Option(200, "--val-limit", min=1, help="Validation rows used."),
    fit: dict,
    tuning: dict,
    no_chat: bool = NoChatOpt,
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report here."),
    force: bool = ForceOpt,
    max_rank: int = MaxRankOpt,
):
    """Fit Laplace-LoRA (KFAC factors over the LoRA weights), tune the prior precision and save
    laplace.safetensors + laplace.json in the adapter directory.

    Needs classification / multiple-choice data (examples with choices, e.g. sst2, strategyqa);
    then `lorafleet eval --bayes` reports MAP vs Laplace calibration. Defaults are the official
    code's: KFAC-expand on up to 1,000 training rows, all LoRA weights, one zero-mean prior
    precision tuned by the marginal likelihood with 100 Adam steps on log lam. Factors wider than
    --threshold are low-rank + diagonal as the paper describes (the official code keeps them
    dense: a large --threshold).

    Examples:

        lorafleet calibrate --base default --adapter runs/sst2 --data sst2

        lorafleet calibrate -b default -a runs/sqa --data strategyqa --val strategyqa --tune val

        lorafleet calibrate -b default -a runs/sst2 --data sst2 --subset last_layer --kfac reduce

        lorafleet calibrate -b default -a runs/sst2 --data sst2 --prior b-only --search grid
    """
    from lorafleet.bayes import calibrate as calibrate_adapter
    from lorafleet.data import load_examples

    loaded, _, model = load_model(base, adapter, force, max_rank)
    tok = loaded.tokenizer
    train = load_examples(data, tok, split=split, chat=not no_chat, limit=train_limit)
    val_set = None
    if val is not None:
        val_set = load_examples(val, tok, split=val_split, chat=not no_chat, limit=val_limit)
    report = calibrate_adapter(
        model,
        tok,
        adapter,
        train,
        val_set,
        config=FIT_OPTIONS.build(fit),
        show_progress=True,
        **dataclasses.asdict(TUNING_OPTIONS.build(tuning)),
    )
    shown = {k: v for k, v in report.items() if not isinstance(v, dict)}
    sections = {"calibration": shown}
    sections.update({k: v for k, v in report.items() if isinstance(v, dict)})
    print_report(sections)
    if json_out is not None:
        write_json(json_out, {"base": base, "adapter": str(adapter), "data": data, **report})
        typer.echo(f"wrote {json_out}")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"Laplace factors written to {report['factors']}")
    return 0


def eval_bayes(
    model,
    tokenizer,
    adapter: Path | None,
    examples,
    *,
    json_out: Path | None,
    batch_size: int,
    max_length: int,
) -> int:
    """`lorafleet eval --bayes`: MAP vs Laplace figures, a reliability diagram and the JSON."""
    from lorafleet.bayes import evaluate_bayes, load_factors
    from lorafleet.bayes.io import val_tuned_prior

    if adapter is None:
        raise LorafleetError("--bayes needs --adapter (a calibrated LoRA adapter)")
    factors = load_factors(adapter)
    # When calibrate saw validation data, also show the prior precision it liked best there.
    best = val_tuned_prior(adapter)
    also = {"val_tuned": best} if best and best != factors.prior_precision else {}
    if json_out is not None:
        plot = json_out.with_name(json_out.stem + ".reliability.png")
    else:
        plot = Path(adapter) / f"reliability-{examples.name}.png"
    figures = evaluate_bayes(
        model,
        tokenizer,
        factors,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        plot=plot,
        show_progress=True,
        also=also,
    )
    sections = {"MAP": figures["map"], "Laplace-LoRA": figures["laplace"]}
    if "laplace_val_tuned" in figures:
        sections["Laplace-LoRA, prior tuned on --val"] = figures["laplace_val_tuned"]
    print_report(sections)
    typer.echo(
        f"prior precision {figures['prior_precision']:.4g} ({figures['prior']} prior); "
        f"reliability diagram {plot}"
    )
    if json_out is not None:
        write_json(json_out, figures)
        typer.echo(f"wrote {json_out}")
    return 0
