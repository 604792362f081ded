"""Prior over the LoRA weights: its kind, the posterior for a precision, tuning by evidence.

Kinds (`PRIORS`), all Gaussian with precision lam per group of weight blocks:
- zero: N(0, 1/lam) on every A and B weight (the paper's prior; one lam).
- init: N(theta_init, 1/lam) on every weight, centred at the adapter's initialisation (A's
  random kaiming-uniform draw, B = 0); needs the recorded initial weights.
- parts: N(0, 1/lam_A) on the A weights, N(0, 1/lam_B) on the B weights, each lam tuned.
- b-only: A fixed at its fitted value, N(0, 1/lam) on the B weights (which start at 0), so the
  prior is centred at the initialisation without recording it.
- b-layers: as b-only with one lam per adapted module (prior_precision: their geometric mean).
The log evidence is a sum over groups, so each group's lam is tuned on its own.

Evidence forms (`EVIDENCE_FORMS`), i.e. how the trained weights theta enter it:
- mode: MacKay's formula, log p(D|theta) - 1/2 [lam ||theta||^2 + logdet(H + lam) - P log lam].
  It assumes theta is the posterior's mode under this very prior (trained with weight decay
  lam / n); for weights trained without it, every coordinate the optimiser moved counts in
  ||theta||^2, including the many the data does not determine, and lam is pushed down.
- quadratic: the exact marginal likelihood of the likelihood's quadratic approximation at theta,
  int N(theta'; theta, H^-1)-shaped likelihood x N(theta'; 0, 1/lam) d theta', i.e. lam ||theta||^2
  replaced by theta^T lam H (H + lam)^-1 theta: a coordinate counts only as far as the
  curvature H pins it down. Its optimum satisfies lam = gamma / ||theta*||^2 with theta* =
  (H + lam)^-1 H theta the prior-consistent mode. Needs the weights (KfacFactors.weights).

Search (`SEARCHES`), how each group's lam is found: "adam" as the official code (laplace-torch's
`optimize_prior_precision(method="marglik")`): `steps` Adam steps (lr 0.1) on log lam from
lam = 1, with the exact slope of the evidence (analytic for the mode form, a central difference
for the quadratic one); it moves log lam by about 0.1 a step, so 100 steps reach lam in about
e^-10..e^10. "grid": a grid over 1e-4..1e7 refined by golden section (the global optimum).
"""

from __future__ import annotations

import math

import torch

from lorafleet.bayes.config import EVIDENCE_FORMS, PRIORS, SEARCHES
from lorafleet.bayes.fit import KfacFactors
from lorafleet.bayes.posterior import BlockPosterior, log_evidence
from lorafleet.errors import LorafleetError

# log10 of the prior precisions searched (then refined between the best grid neighbours).
GRID_LOG10 = (-4.0, 7.0)
GRID_POINTS = 67
EDGE_TOL = 0.01  # nats
ADAM_LR = 0.1  # the official code's (laplace-torch's optimize_prior_precision lr)
ADAM_STEPS = 100  # the official run script's --laplace_optim_step


def group_of(prior: str, part: str, name: str = "") -> str | None:
    """The precision group of module `name`'s A or B block under `prior`; None: held fixed."""
    if prior == "parts":
        return part
    if prior == "b-only":
        return "B" if part == "B" else None
    if prior == "b-layers":
        return f"B {name}" if part == "B" else None
    return "all"


def check_prior(factors: KfacFactors, prior: str, form: str = "mode") -> None:
    if prior not in PRIORS:
        raise LorafleetError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    if form not in EVIDENCE_FORMS:
        raise LorafleetError(f"evidence must be one of {', '.join(EVIDENCE_FORMS)}, got {form!r}")
    if form == "quadratic" and not factors.weights:
        raise LorafleetError(
            "evidence 'quadratic' needs the adapter's weights in the factors "
            "(fitted before they were recorded): run calibrate again"
        )
    if form == "quadratic" and prior == "init" and not factors.init_weights:
        raise LorafleetError(
            "evidence 'quadratic' with prior 'init' needs the initial weights "
            "in the factors: run calibrate again"
        )
    if prior == "init" and not factors.init_sq:
        raise LorafleetError(
            "prior 'init' needs the adapter's initial weights "
            "(lora_init.safetensors); use prior 'b-only'"
        )


def group_lams(factors: KfacFactors, prior_precision: float) -> dict[str, float]:
    groups = {group_of(factors.prior, p, n) for n, p, _, _ in factors.blocks()} - {None}
    return {g: prior_precision * factors.ratios.get(g, 1.0) for g in groups}


class AdapterPosterior:
    """The block posteriors of the LoRA weights the prior covers, for one prior precision
    (the reference group's lam; other groups at their tuned ratio to it)."""

    def __init__(self, factors: KfacFactors, prior_precision: float):
        self.prior_precision = float(prior_precision)
        lams = group_lams(factors, self.prior_precision)
        self.blocks = {}
        for name, part, small, big in factors.blocks():
            group = group_of(factors.prior, part, name)
            if group is not None:
                self.blocks[(name, part)] = BlockPosterior(small, big, lams[group], factors.n)

    def logdet(self) -> float:
        return sum(b.logdet() for b in self.blocks.values())


def posterior(factors: KfacFactors, prior_precision: float | None = None) -> AdapterPosterior:
    """The (cached) posterior at `prior_precision`, default the factors' tuned one."""
    lam = factors.prior_precision if prior_precision is None else prior_precision
    if lam is None:
        raise ValueError("no prior precision: tune one first (tune_prior) or pass it")
    key = float(lam)
    return factors.cached(key, lambda: AdapterPosterior(factors, key))


def _group_sq(factors: KfacFactors, prior: str, group: str) -> float:
    norms = factors.init_sq if prior == "init" else factors.block_sq
    if not norms:  # factors saved before per-block norms: only the whole-adapter norm
        return factors.theta_sq
    return sum(v for (n, part), v in norms.items() if group_of(prior, part, n) == group)


def _centred(factors: KfacFactors, prior: str, name: str, part: str):
    """The oriented block the prior sees: theta, or theta - theta_init under the init prior."""
    w = factors.weights[(name, part)]
    return w - factors.init_weights[(name, part)] if prior == "init" else w


def group_evidence(
    factors: KfacFactors, prior: str, group: str, lam: float, form: str | None = None
) -> float:
    """One group's share of the log evidence (without log p(D|theta)) at precision lam, in the
    evidence form `form` (default the factors')."""
    form = factors.evidence_form if form is None else form
    logdet, size, fit = 0.0, 0, 0.0
    for name, part, small, big in factors.blocks():
        if group_of(prior, part, name) == group:
            block = BlockPosterior(small, big, lam, factors.n)
            logdet += block.logdet()
            size += small.dim * big.dim
            if form == "quadratic":
                fit += block.data_fit(_centred(factors, prior, name, part))
    sq = _group_sq(factors, prior, group)
    return log_evidence(0.0, sq, logdet, size, lam, fit if form == "quadratic" else None)


def group_slope(
    factors: KfacFactors, prior: str, group: str, lam: float, form: str | None = None
) -> float:
    """d group_evidence / d log lam at lam. Mode form, exactly:
    -lam/2 [||theta_g||^2 + tr((H + lam)^-1) - P_g / lam]; quadratic: a central difference."""
    form = factors.evidence_form if form is None else form
    if form == "quadratic":
        h = 1e-2  # the evidence sums float32 terms: smaller steps difference round-off
        up = group_evidence(factors, prior, group, lam * math.exp(h), form)
        down = group_evidence(factors, prior, group, lam * math.exp(-h), form)
        return (up - down) / (2 * h)
    trace, size = 0.0, 0
    for name, part, small, big in factors.blocks():
        if group_of(prior, part, name) == group:
            trace += BlockPosterior(small, big, lam, factors.n).trace_cov()
            size += small.dim * big.dim
    return -0.5 * lam * (_group_sq(factors, prior, group) + trace - size / lam)


def _adam(slope, steps: int) -> tuple[float, list[float]]:
    """Adam (torch's, lr ADAM_LR) ascending a function of x = log lam from x = 0 given its
    slope; returns (x, the x visited)."""
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=ADAM_LR)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        x.grad = torch.tensor(-slope(float(x.detach())), dtype=torch.float64)  # Adam minimises
        opt.step()
        path.append(float(x.detach()))
    return float(x.detach()), path


def evidence(factors: KfacFactors, prior_precision: float) -> float:
    """Laplace log marginal likelihood of the training data at this prior precision
    (the reference group's; the others at their ratios)."""
    lams = group_lams(factors, prior_precision)
    return factors.log_lik + sum(
        group_evidence(factors, factors.prior, g, lam) for g, lam in lams.items()
    )


def _maximise(f, iters: int) -> tuple[float, list[tuple[float, float]], bool]:
    """argmax of f over log10 lam: a grid, then golden-section between the best point's
    neighbours. Returns (log10 lam, [(log10 lam, f)] on the grid, optimum on the range's edge)."""
    lo, hi = GRID_LOG10
    grid = torch.linspace(lo, hi, GRID_POINTS).tolist()
    values = [f(g) for g in grid]
    best = max(range(len(grid)), key=lambda i: values[i])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 > f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = f(x2)
    x, fx = (x1, f1) if f1 > f2 else (x2, f2)
    if values[best] >= fx:
        x = grid[best]
    # On the edge: an end of the range is as good as the optimum (within EDGE_TOL nats), so
    # the range does not bracket it (a flat or monotone evidence).
    on_edge = max(values[0], values[-1]) >= max(fx, values[best]) - EDGE_TOL
    return x, list(zip(grid, values, strict=True)), on_edge


def tune_prior(
    factors: KfacFactors,
    *,
    prior: str | None = None,
    form: str | None = None,
    iters: int = 30,
    search: str = "grid",
    steps: int = ADAM_STEPS,
) -> tuple[float, list[dict]]:
    """Each group's lam maximising the evidence (in `form`, EVIDENCE_FORMS; default the
    factors') under `prior` (default the factors' kind), found by `search` (SEARCHES: "grid",
    or `steps` Adam steps as the official code); sets factors.evidence_form too.
    Sets factors.prior and factors.ratios (each group's lam over the reference group's, "B" or
    "all") and returns (reference lam, curve): per point visited (the grid, or Adam's steps)
    {"prior_precision", "log_evidence", "group"}, the group's share plus log p(D|theta) (the
    whole evidence when there is one group). factors.edge lists the groups whose optimum is on
    the grid's edge (or, for Adam, still moving after its last step: beyond its reach)."""
    prior = factors.prior if prior is None else prior
    form = factors.evidence_form if form is None else form
    check_prior(factors, prior, form)
    if search not in SEARCHES:
        raise LorafleetError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    factors.evidence_form = form
    groups = sorted({group_of(prior, p, n) for n, p, _, _ in factors.blocks()} - {None})
    best, curve, edge = {}, [], []
    for g in groups:
        if search == "adam":
            x, path = _adam(lambda x, g=g: group_slope(factors, prior, g, math.exp(x), form), steps)
            best[g] = math.exp(x)
            curve += [
                {
                    "prior_precision": math.exp(p),
                    "log_evidence": factors.log_lik
                    + group_evidence(factors, prior, g, math.exp(p), form),
                    "group": g,
                }
                for p in path[:: max(1, len(path) // 20)]
            ]
            if len(path) > 1 and abs(path[-1] - path[-2]) > 0.5 * ADAM_LR:
                edge.append(g)
            continue
        x, points, on_edge = _maximise(
            lambda x, g=g: group_evidence(factors, prior, g, 10.0**x, form), iters
        )
        best[g] = 10.0**x
        curve += [
            {"prior_precision": 10.0**p, "log_evidence": factors.log_lik + v, "group": g}
            for p, v in points
        ]
        if on_edge:
            edge.append(g)
    ref = "B" if "B" in best else "all" if "all" in best else None
    if ref is None:  # one group per layer: the reference is their geometric mean
        mean = math.exp(sum(math.log(v) for v in best.values()) / len(best))
        factors.prior, factors.ratios = prior, {g: lam / mean for g, lam in best.items()}
        factors.edge = edge
        factors.forget()
        return mean, curve
    factors.prior, factors.ratios = prior, {g: lam / best[ref] for g, lam in best.items()}
    factors.edge = edge
    factors.forget()
    return best[ref], curve
