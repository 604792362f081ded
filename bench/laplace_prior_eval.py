"""MAP vs Laplace-LoRA under each prior kind (evidence- and validation-tuned) on held-out rows."""

# Usage: python bench/laplace_prior_eval.py ADAPTER TASK TRAIN_ROWS OUT.json [TUNE_ROWS TEST_ROWS]
# Factors from the first TRAIN_ROWS training rows (those the adapter was fitted to). For every
# prior kind (zero, init when lora_init.safetensors exists, parts, b-only): the evidence-tuned
# prior precision, and the validation-tuned one (lowest NLL over evidence x 1e-3..1e3 on
# validation rows 0..TUNE_ROWS-1). All are scored on validation rows TUNE_ROWS..TUNE_ROWS+TEST
# _ROWS-1, which no tuning saw. Linearised predictive, Monte-Carlo link (2000 draws, seed 0).
import copy
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lorafleet.adapters import load_adapter  # noqa: E402
from lorafleet.bayes.calibrate import VAL_FACTORS  # noqa: E402
from lorafleet.bayes.capture import batches, capture, class_items, lora_layers  # noqa: E402
from lorafleet.bayes.fit import LaplaceConfig, fit_kfac  # noqa: E402
from lorafleet.bayes.io import read_init  # noqa: E402
from lorafleet.bayes.metrics import calibration_report  # noqa: E402
from lorafleet.bayes.predictive import link_probs, logit_cov  # noqa: E402
from lorafleet.bayes.prior import PRIORS, AdapterPosterior, group_lams, tune_prior  # noqa: E402
from lorafleet.data import load_examples  # noqa: E402
from lorafleet.models import load_base  # noqa: E402

adapter, task, rows, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
tune_rows = int(sys.argv[5]) if len(sys.argv) > 5 else 100
test_rows = int(sys.argv[6]) if len(sys.argv) > 6 else 200
t0 = time.time()
base = load_base("default")
tok = base.tokenizer
_, model = load_adapter(adapter, base.model)
pad = tok.pad_token_id or 0
train = load_examples(task, tok, split="train", chat=True, limit=rows)
val = load_examples(task, tok, split="validation", chat=True, limit=tune_rows + test_rows)
items = class_items(tok, train.examples, max_length=128)
vitems = class_items(tok, val.examples, max_length=128)
labels = torch.tensor([it.label for it in vitems])
init = read_init(adapter)
factors = fit_kfac(model, items, LaplaceConfig(n_kfac=16), pad=pad, init=init)
print(f"fit {time.time() - t0:.0f}s", flush=True)
norms = {
    "A_sq": sum(v for (_, p), v in factors.block_sq.items() if p == "A"),
    "B_sq": sum(v for (_, p), v in factors.block_sq.items() if p == "B"),
}
if factors.init_sq:
    norms["A_minus_init_sq"] = sum(v for (_, p), v in factors.init_sq.items() if p == "A")
result = {
    "adapter": str(adapter),
    "task": task,
    "train_rows": rows,
    "norms": norms,
    "train_log_lik": factors.log_lik,
    "n_params": factors.n_params,
    "priors": {},
}
posts, names = [], []
# FORMS: the evidence forms (prior.EVIDENCE_FORMS); a "quadratic" row is keyed "PRIOR quadratic".
combos = [
    (p, form)
    for p in os.environ.get("PRIORS", ",".join(PRIORS)).split(",")
    for form in os.environ.get("FORMS", "mode,quadratic").split(",")
]
for prior, form in combos:
    if prior == "init" and not factors.init_sq:
        continue
    f = copy.copy(factors)
    f._cache = {}
    lam, curve = tune_prior(f, prior=prior, form=form)
    key = prior if form == "mode" else f"{prior} {form}"
    result["priors"][key] = {
        "evidence_lam": lam,
        "groups": group_lams(f, lam),
        "edge": f.edge,
        "curve": curve,
    }
    for k in VAL_FACTORS:
        posts.append(AdapterPosterior(f, lam * k))
        names.append((key, k))
    print(key, lam, group_lams(f, lam), f.edge, flush=True)
layers = lora_layers(model)
N = len(vitems)
logits = torch.zeros(N, 2)
covs = [torch.zeros(N, 1, 1) for _ in posts]
model.eval()
for idx in batches(vitems, 8):
    cap = capture(model, layers, [vitems[i] for i in idx], pad=pad)
    logits[idx] = cap.f.detach()
    for k, post in enumerate(posts):
        covs[k][idx] = logit_cov(cap, post)
    print(f"{idx[-1] + 1}/{N} {time.time() - t0:.0f}s", flush=True)
tune, test = slice(0, tune_rows), slice(tune_rows, N)


def probs_of(cov):
    return link_probs(logits, cov, "mc", samples=2000, generator=torch.Generator().manual_seed(0))


map_probs = torch.softmax(logits, -1)
result["test"] = {"MAP": calibration_report(map_probs[test], labels[test])}
result["tune_rows_map"] = calibration_report(map_probs[tune], labels[tune])
for prior in result["priors"]:
    rows_ = [(k, probs_of(covs[i])) for i, (p, k) in enumerate(names) if p == prior]
    grid = [{"factor": k, **calibration_report(pr[tune], labels[tune])} for k, pr in rows_]
    best = min(grid, key=lambda r: r["nll"])["factor"]
    lam = result["priors"][prior]["evidence_lam"]
    result["priors"][prior]["val_grid"] = grid
    result["priors"][prior]["val_lam"] = lam * best
    for label, k in (("evidence", 1.0), ("val", best)):
        pr = next(p for kk, p in rows_ if kk == k)
        result["test"][f"{prior}/{label}"] = {
            **calibration_report(pr[test], labels[test]),
            "lam": lam * k,
        }
result["seconds"] = time.time() - t0
out.write_text(json.dumps(result, indent=1))


def plot(result: dict, path: Path) -> None:
    """Log evidence (minus its maximum) against each group's prior precision, per prior kind;
    dotted: the evidence's optimum, dashed red: the validation-tuned precision."""
    priors = result["priors"]
    fig, axes = plt.subplots(1, len(priors), figsize=(4 * len(priors), 3.2), sharey=True)
    for ax, (prior, info) in zip(axes, priors.items(), strict=True):
        scale = info["val_lam"] / info["evidence_lam"]
        for g in sorted({c["group"] for c in info["curve"]}):
            pts = [
                (c["prior_precision"], c["log_evidence"]) for c in info["curve"] if c["group"] == g
            ]
            top = max(v for _, v in pts)
            line = ax.semilogx(
                [x for x, _ in pts],
                [v - top for _, v in pts],
                label=f"{g}: evidence lam {info['groups'][g]:.3g}",
            )
            ax.axvline(info["groups"][g], ls=":", c=line[0].get_color())
            ax.axvline(info["groups"][g] * scale, ls="--", c="r")
        ax.set_ylim(-400, 20)
        ax.set_title(f"{result['task']}: prior {prior} (red: val-tuned)", fontsize=9)
        ax.set_xlabel("prior precision")
        if len(info["groups"]) <= 4:
            ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("log evidence - max")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


plot(result, out.with_suffix(".png"))
for k, v in result["test"].items():
    print(
        f"{k:20s} acc {v['accuracy']:.3f} ece {v['ece']:.3f} nll {v['nll']:.3f} "
        f"brier {v['brier']:.3f} lam {v.get('lam', float('nan')):.3g}"
    )
