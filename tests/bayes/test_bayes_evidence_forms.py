"""The "quadratic" evidence form: equal to the dense Gaussian marginal likelihood of the
likelihood's quadratic approximation, its optimum found by tune_prior, undetermined movement
ignored, and saved with the factors."""

from __future__ import annotations

import math

import pytest
import torch
from bayes_helpers import random_items, tiny_lora

from lorafleet.bayes import fit_kfac, load_factors, save_factors, tune_prior
from lorafleet.bayes.fit import LaplaceConfig
from lorafleet.bayes.prior import group_evidence
from lorafleet.errors import LorafleetError


def _dense_quadratic_evidence(factors, lam: float, part: str = "B") -> float:
    """sum over `part` blocks of log N(theta; 0, H^-1 + I / lam) up to a constant in lam, from
    the explicit dense curvature H = kron(S, F) / n (theta flattened row-major, as oriented)."""
    total = 0.0
    for name, p, small, big in factors.blocks():
        if p != part:
            continue
        H = torch.kron(small.matrix().double(), big.matrix().double()) / factors.n
        x = factors.weights[(name, p)].double().flatten()
        eye = torch.eye(H.shape[0], dtype=torch.float64)
        fit = float(x @ (lam * H) @ torch.linalg.solve(H + lam * eye, x))
        logdet = float(torch.linalg.slogdet(H + lam * eye)[1])
        total += -0.5 * (fit + logdet - H.shape[0] * math.log(lam))
    return total


@pytest.mark.parametrize(
    "config",
    [LaplaceConfig(), LaplaceConfig(n_kfac=3, threshold=8)],
    ids=["dense", "low-rank+diagonal"],
)
def test_quadratic_evidence_equals_the_dense_marginal_likelihood_and_its_brute_force_optimum(
    config,
):
    # B large enough for the data to pin some of it down (smaller: the optimum is lam -> inf).
    factors = fit_kfac(tiny_lora(seed=4, scale=1.0), random_items(16, seed=2), config)
    dense = any(not big.is_dense for _, _, _, big in factors.blocks())
    assert dense == (config.threshold == 8)  # the second case really is low-rank + diagonal
    grid = [10.0**x for x in torch.linspace(-3, 5, 81).tolist()]  # steps of 10^0.1
    ours = [group_evidence(factors, "b-only", "B", g, "quadratic") for g in grid]
    ref = [_dense_quadratic_evidence(factors, g) for g in grid]
    for a, b in zip(ours, ref, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)
    lam, _ = tune_prior(factors, prior="b-only", form="quadratic")
    best = grid[max(range(len(grid)), key=lambda i: ref[i])]
    assert abs(math.log10(lam / best)) <= 0.1 + 1e-6
    assert factors.evidence_form == "quadratic" and factors.edge == []


def test_movement_the_curvature_does_not_determine_leaves_the_quadratic_optimum_alone():
    # The defining difference from the "mode" form: add to B a large component in the
    # directions with the least curvature; ||B||^2 grows 100-fold, which drags the mode form's
    # lam down by orders of magnitude, while the quadratic form barely moves.
    factors = fit_kfac(tiny_lora(seed=4, scale=1.0), random_items(16, seed=2))
    lam_q, _ = tune_prior(factors, prior="b-only", form="quadratic")
    assert factors.edge == []
    lam_m, _ = tune_prior(factors, prior="b-only", form="mode")
    for (name, part), w in list(factors.weights.items()):
        if part != "B":
            continue
        small, big = factors.modules[name].block("B")
        # The rotated coordinate with the smallest curvature sigma_j s_i of this block.
        j, i = int(small.s.argmin()), int(big.s.argmin())
        flat = torch.outer(small.U[:, j], big.U[:, i])  # [r, d] unit norm
        extra = flat * 10.0 * w.norm()
        factors.weights[(name, part)] = w + extra
        factors.block_sq[(name, part)] = float((w + extra).pow(2).sum())
    lam_q2, _ = tune_prior(factors, prior="b-only", form="quadratic")
    lam_m2, _ = tune_prior(factors, prior="b-only", form="mode")
    assert lam_m2 < lam_m / 30  # the mode form reads the movement as a wide prior
    assert abs(math.log10(lam_q2 / lam_q)) < 0.3  # the quadratic form does not


def test_weights_and_the_form_survive_save_and_load_and_old_factors_are_refused(tmp_path):
    factors = fit_kfac(tiny_lora(seed=1), random_items(8, seed=1))
    lam, _ = tune_prior(factors, prior="b-only", form="quadratic")
    factors.prior_precision = lam
    save_factors(tmp_path, factors)
    back = load_factors(tmp_path, check_adapter=False)
    assert back.evidence_form == "quadratic"
    assert set(back.weights) == set(factors.weights)
    assert tune_prior(back)[0] == pytest.approx(lam, rel=1e-6)
    back.weights = {}  # as factors saved before the weights were recorded
    with pytest.raises(LorafleetError, match="needs the adapter's weights"):
        tune_prior(back, form="quadratic")
    with pytest.raises(LorafleetError, match="evidence must be one of"):
        tune_prior(factors, form="nope")
