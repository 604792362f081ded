"""Calibrate an adapter (fit, tune, save) and evaluate MAP vs Laplace: what the CLI calls."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lorafleet.bayes.capture import class_items
from lorafleet.bayes.config import CalibrateConfig, LaplaceConfig
from lorafleet.bayes.fit import KfacFactors, fit_kfac
from lorafleet.bayes.io import INIT_NAME, read_init, save_factors
from lorafleet.bayes.metrics import calibration_report, reliability_diagram
from lorafleet.bayes.predictive import (
    LINKS,
    glm_predictive_grid,
    map_predictive,
    sampled_predictive,
)
from lorafleet.bayes.prior import GRID_LOG10, group_lams, tune_prior
from lorafleet.bayes.prior import evidence as log_evidence_at
from lorafleet.data import ExampleSet
from lorafleet.errors import LorafleetError

# Prior precisions tried on validation data: the evidence optimum times these factors.
VAL_FACTORS = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="ex")


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _labels(examples: ExampleSet) -> torch.Tensor:
    if any(ex.label is None for ex in examples):
        raise LorafleetError(f"{examples.name}: every example needs a label")
    return torch.tensor([ex.label for ex in examples])


def calibrate(
    model,
    tokenizer,
    adapter_dir: str | Path,
    train: ExampleSet,
    val: ExampleSet | None = None,
    *,
    config: LaplaceConfig | None = None,
    tune: str = CalibrateConfig.tune,
    max_length: int = CalibrateConfig.max_length,
    show_progress: bool = False,
    weight_samples: int = CalibrateConfig.weight_samples,
    prior: str = CalibrateConfig.prior,
    evidence: str = CalibrateConfig.evidence,
    search: str = CalibrateConfig.search,
    prior_steps: int = CalibrateConfig.prior_steps,
) -> dict:
    """Fit KFAC factors on `train`, tune the prior precision (evidence, or validation NLL when
    tune="val") of the `prior` kind (config.PRIORS), save them beside the adapter and return a
    report of the figures (with `weight_samples` > 0 also the weight-sampling predictive on
    `val`); the evidence in the `evidence` form (config.EVIDENCE_FORMS), maximised by `search`
    (config.SEARCHES; `prior_steps` Adam steps); report["warnings"] lists tuned precisions on
    the edge of their search range. The settings after `val` are CalibrateConfig's fields (and
    checked by it) and LaplaceConfig's."""
    CalibrateConfig(tune, prior, evidence, max_length, weight_samples, search, prior_steps)
    init = read_init(adapter_dir)
    if prior == "init" and init is None:
        raise LorafleetError(
            f"prior 'init' needs {Path(adapter_dir) / INIT_NAME} (the adapter's weights before "
            "training: `lorafleet train` records it for LoRA and rsLoRA runs; PEFT draws A from "
            "the torch RNG, so it cannot be rebuilt afterwards); "
            "use prior 'b-only'"
        )
    if tune == "val" and val is None:
        raise LorafleetError("tune 'val' needs validation data (val)")
    cfg = config or LaplaceConfig()
    pad = _pad(tokenizer)
    items = class_items(tokenizer, train.examples, max_length=max_length, name=train.name)
    val_items = None
    if val is not None:
        val_items = class_items(tokenizer, val.examples, max_length=max_length, name=val.name)
    start = time.perf_counter()
    with _bar(len(items), "fitting KFAC factors", show_progress) as bar:
        factors = fit_kfac(
            model, items, cfg, pad=pad, progress=bar.update if bar else None, init=init
        )
    fit_s = time.perf_counter() - start
    lam, curve = tune_prior(factors, prior=prior, form=evidence, search=search, steps=prior_steps)
    report: dict = {
        "train_examples": factors.n,
        "parameters": factors.n_params,
        "subset": cfg.subset,
        "kfac": cfg.kfac,
        "search": search,
        "train_log_lik": factors.log_lik,
        "prior": prior,
        "evidence_form": evidence,
        "evidence_prior_precision": lam,
        "log_evidence": log_evidence_at(factors, lam),
        "fit_seconds": fit_s,
    }
    span = f"1e{GRID_LOG10[0]:g}..1e{GRID_LOG10[1]:g}"
    where = (
        f"lies on the edge of the searched range {span}"
        if search == "grid"
        else f"was still moving after {prior_steps} Adam steps (try --search grid)"
    )
    warnings = [f"the evidence's optimum for the {g} weights {where}" for g in factors.edge]
    tuning: dict = {
        "method": tune,
        "prior": prior,
        "evidence_form": evidence,
        "evidence_curve": curve,
        "group_precisions": group_lams(factors, lam),
    }
    if val_items is not None:
        labels = _labels(val)
        grid = [lam * f for f in VAL_FACTORS]
        with _bar(len(val_items), "validation grid", show_progress) as bar:
            preds = glm_predictive_grid(
                model,
                val_items,
                factors,
                grid,
                pad=pad,
                batch_size=cfg.batch_size,
                progress=bar.update if bar else None,
            )
        table = [
            {"prior_precision": g, **calibration_report(p.probs, labels)}
            for g, p in zip(grid, preds, strict=True)
        ]
        tuning["val_grid"] = table
        if tune == "val":
            lam = min(table, key=lambda row: row["nll"])["prior_precision"]
            if lam in (grid[0], grid[-1]):
                span = f"{VAL_FACTORS[0]:g}..{VAL_FACTORS[-1]:g}"
                warnings.append(
                    f"the validation NLL is lowest at the edge of its grid (evidence x {span})"
                )
        chosen = next(row for row in table if row["prior_precision"] == lam)
        map_probs = map_predictive(model, val_items, batch_size=cfg.batch_size, pad=pad).probs
        report["val_map"] = calibration_report(map_probs, labels)
        report["val_laplace"] = {k: chosen[k] for k in ("accuracy", "ece", "nll", "brier")}
        if weight_samples > 0:
            factors.prior_precision = lam
            with _bar(weight_samples, "weight samples", show_progress) as bar:
                sampled = sampled_predictive(
                    model,
                    val_items,
                    factors,
                    samples=weight_samples,
                    batch_size=cfg.batch_size,
                    pad=pad,
                    progress=bar.update if bar else None,
                )
            report["val_laplace_sampled"] = calibration_report(sampled.probs, labels)
    factors.prior_precision = lam
    report["prior_precision"] = lam
    report["group_precisions"] = group_lams(factors, lam)
    report["tune"] = tune
    report["warnings"] = warnings
    report["seconds"] = time.perf_counter() - start
    path = save_factors(adapter_dir, factors, extra={"tuning": tuning})
    report["factors"] = str(path)
    return report


def evaluate_bayes(
    model,
    tokenizer,
    factors: KfacFactors,
    examples: ExampleSet,
    *,
    link: str = "mc",
    samples: int = 2000,
    weight_samples: int = 0,
    max_length: int = 1024,
    batch_size: int = 8,
    plot: str | Path | None = None,
    show_progress: bool = False,
    seed: int = 0,
    also: dict[str, float] | None = None,
) -> dict:
    """MAP vs Laplace (GLM predictive; optionally weight sampling) on labelled choice data:
    {"map": {accuracy, ece, nll, brier}, "laplace": {...}, "prior_precision": lam, ...}.
    `also` {name: lam}: Laplace at other prior precisions too, from the same pass
    ("laplace_<name>": {..., "prior_precision"})."""
    if link not in LINKS:
        raise LorafleetError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
    if factors.prior_precision is None:
        raise LorafleetError("the Laplace factors have no tuned prior precision; run calibrate")
    pad = _pad(tokenizer)
    items = class_items(tokenizer, examples.examples, max_length=max_length, name=examples.name)
    labels = _labels(examples)
    also = dict(also or {})
    with _bar(len(items), "Laplace predictive", show_progress) as bar:
        glm, *others = glm_predictive_grid(
            model,
            items,
            factors,
            [factors.prior_precision, *also.values()],
            link=link,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            pad=pad,
            progress=bar.update if bar else None,
        )
    map_probs = torch.softmax(glm.logits, dim=-1)
    result = {
        "map": calibration_report(map_probs, labels),
        "laplace": calibration_report(glm.probs, labels),
        "prior_precision": factors.prior_precision,
        "prior": factors.prior,
        "examples": len(items),
        "link": link,
        # Posterior std of the logit contrasts f_c - f_0: how much the Laplace layer softens.
        "mean_logit_std": float(glm.cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().mean()),
    }
    curves = {"MAP": map_probs, f"Laplace (GLM, {link})": glm.probs}
    for (name, lam), pred in zip(also.items(), others, strict=True):
        result[f"laplace_{name}"] = {
            **calibration_report(pred.probs, labels),
            "prior_precision": lam,
        }
        curves[f"Laplace ({name}, lam {lam:.3g})"] = pred.probs
    if weight_samples > 0:
        with _bar(weight_samples, "weight samples", show_progress) as bar:
            sampled = sampled_predictive(
                model,
                items,
                factors,
                samples=weight_samples,
                batch_size=batch_size,
                seed=seed,
                pad=pad,
                progress=bar.update if bar else None,
            )
        result["laplace_sampled"] = calibration_report(sampled.probs, labels)
        result["weight_samples"] = weight_samples
        curves[f"Laplace (sampled x{weight_samples})"] = sampled.probs
    if plot is not None:
        result["plot"] = str(reliability_diagram(curves, labels, plot, title=examples.name))
    return result
