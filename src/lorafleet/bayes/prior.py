"""Prior precision: the whole-adapter posterior for a given lam, and lam by maximum evidence."""

from __future__ import annotations

import math

import torch

from lorafleet.bayes.fit import KfacFactors
from lorafleet.bayes.posterior import BlockPosterior, log_evidence

# log10 of the prior precisions searched (then refined between the best grid neighbours).
GRID_LOG10 = (-4.0, 6.0)
GRID_POINTS = 61


class AdapterPosterior:
    """The block posteriors of every LoRA A and B weight for one prior precision."""

    def __init__(self, factors: KfacFactors, prior_precision: float):
        self.prior_precision = float(prior_precision)
        self.blocks = {
            (name, part): BlockPosterior(small, big, prior_precision, factors.n)
            for name, part, small, big in factors.blocks()
        }

    def logdet(self) -> float:
        return sum(b.logdet() for b in self.blocks.values())


def posterior(factors: KfacFactors, prior_precision: float | None = None) -> AdapterPosterior:
    """The (cached) posterior at `prior_precision`, default the factors' tuned one."""
    lam = factors.prior_precision if prior_precision is None else prior_precision
    if lam is None:
        raise ValueError("no prior precision: tune one first (tune_prior) or pass it")
    key = float(lam)
    if key not in factors._cache:
        factors._cache.clear()  # one at a time: a posterior holds O(r d k) per block
        factors._cache[key] = AdapterPosterior(factors, key)
    return factors._cache[key]


def evidence(factors: KfacFactors, prior_precision: float) -> float:
    """Laplace log marginal likelihood of the training data at this prior precision."""
    logdet = AdapterPosterior(factors, prior_precision).logdet()
    return log_evidence(factors.log_lik, factors.theta_sq, logdet, factors.n_params,
                        prior_precision)  # fmt: skip


def tune_prior(factors: KfacFactors, *, iters: int = 30) -> tuple[float, list[dict]]:
    """lam maximising the evidence: a log-spaced grid, then golden-section search in log lam
    between the best point's neighbours. Returns (lam, [{"prior_precision", "log_evidence"}])."""
    lo, hi = GRID_LOG10
    grid = torch.linspace(lo, hi, GRID_POINTS).tolist()
    values = [evidence(factors, 10.0**g) for g in grid]
    pairs = zip(grid, values, strict=True)
    curve = [{"prior_precision": 10.0**g, "log_evidence": v} for g, v in pairs]
    best = max(range(len(grid)), key=lambda i: values[i])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    # Golden-section on a unimodal bracket; the grid point stays if refinement finds no better.
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = evidence(factors, 10.0**x1), evidence(factors, 10.0**x2)
    for _ in range(iters):
        if f1 > f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = evidence(factors, 10.0**x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = evidence(factors, 10.0**x2)
    x, fx = (x1, f1) if f1 > f2 else (x2, f2)
    if values[best] >= fx:
        x = grid[best]
    return 10.0**x, curve
