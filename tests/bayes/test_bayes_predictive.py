"""GLM predictive against explicit Jacobians, low-rank convergence, prior tuning, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from bayes_helpers import dense_ggn, exact_jacobians, random_items, tiny_lora

from lorafleet.bayes import (
    LaplaceConfig,
    brier,
    ece,
    evidence,
    fit_kfac,
    glm_predictive,
    map_predictive,
    nll,
    sampled_predictive,
    tune_prior,
)
from lorafleet.bayes.factors import Factor, eig_factor
from lorafleet.bayes.posterior import BlockPosterior
from lorafleet.bayes.predictive import link_probs


def _contrasts(J):
    """Jacobian rows of f_c - f_0 (c >= 1) from those of f: [C, P] -> [C-1, P]."""
    return J[1:] - J[:1]


def _explicit_cov(model, factors, items, lam):
    """sum over blocks of J (kron(S, F)/n + lam I)^-1 J^T, J of the logit contrasts from
    torch.func."""
    out = []
    for item in items:
        jac = exact_jacobians(model, item)
        cov = 0
        for name, part, small, big in factors.blocks():
            P = torch.kron(small.matrix().double(), big.matrix().double()) / factors.n
            P = P + lam * torch.eye(P.shape[0], dtype=torch.float64)
            J = _contrasts(jac[(name, part)].double())
            cov = cov + J @ torch.linalg.solve(P, J.T)
        out.append(cov)
    return torch.stack(out).float()


# Dense factors, then low-rank + diagonal factors whose rank holds every vector (exact).
@pytest.mark.parametrize("threshold", [512, 16])
def test_glm_variance_matches_explicit_jacobians(threshold):
    model = tiny_lora(seed=1)
    train, test = random_items(12, seed=2, classes=3), random_items(4, seed=3, classes=3)
    factors = fit_kfac(model, train, LaplaceConfig(batch_size=5, threshold=threshold, n_kfac=40))
    assert any(not m.A_in.is_dense for m in factors.modules.values()) == (threshold == 16)
    lam = 0.7
    pred = glm_predictive(model, test, factors, prior_precision=lam, link="probit")
    expected = _explicit_cov(model, factors, test, lam)
    torch.testing.assert_close(pred.cov, expected, rtol=1e-4, atol=1e-4 * float(expected.max()))
    # The mean is the MAP logits of the model's own forward.
    logits = torch.stack(
        [model(input_ids=torch.tensor([it.ids])).logits[0, -1, list(it.classes)] for it in test]
    ).detach()
    torch.testing.assert_close(pred.logits, logits, rtol=1e-4, atol=1e-4)


def test_low_rank_factors_approach_dense_kfac_and_the_exact_ggn_as_rank_grows():
    model = tiny_lora(seed=0)
    train, test = random_items(24, seed=1), random_items(6, seed=2)
    lam = 1.0
    # reduce: one vector per example, so rank 24 holds all of them (expand: one per position).
    dense = fit_kfac(model, train, LaplaceConfig(batch_size=8, kfac="reduce"))
    ref = glm_predictive(model, test, dense, prior_precision=lam, link="probit").cov
    H, _, _ = dense_ggn(model, train)
    sigma = torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=torch.float64))
    ggn = []
    for item in test:
        J = _contrasts(torch.cat(list(exact_jacobians(model, item).values()), 1).double())
        ggn.append(J @ sigma @ J.T)
    ggn = torch.stack(ggn).float()
    to_dense, to_ggn = [], []
    for k in (1, 2, 4, 8, 16, 24):
        cfg = LaplaceConfig(batch_size=8, n_kfac=k, threshold=16, kfac="reduce")
        f = fit_kfac(model, train, cfg)
        cov = glm_predictive(model, test, f, prior_precision=lam, link="probit").cov
        to_dense.append(float((cov - ref).norm() / ref.norm()))
        to_ggn.append(float((cov - ggn).norm() / ggn.norm()))
    # Against dense KFAC: strictly better with every doubling, exact once k >= 24 examples.
    assert all(b < a for a, b in zip(to_dense, to_dense[1:-1], strict=False)), to_dense
    assert to_dense[0] > 0.01 and to_dense[-1] < 1e-5, to_dense
    # Against the exact dense GGN: closer than rank 1, down to KFAC's own (Kronecker) error.
    kfac_floor = float((ref - ggn).norm() / ggn.norm())
    assert to_ggn[0] > to_ggn[-1] and to_ggn[-1] == pytest.approx(kfac_floor, rel=1e-3)
    assert kfac_floor < 0.3, kfac_floor


def test_block_samples_have_the_posterior_covariance():
    gen = torch.Generator().manual_seed(0)
    small = eig_factor((lambda a: a @ a.T)(torch.randn(3, 3, generator=gen)))
    X = torch.randn(12, 4, generator=gen)
    U, s, _ = torch.linalg.svd(X @ X.T / 4)
    big = Factor(U[:, :2].contiguous(), s[:2], torch.rand(12, generator=gen))  # low-rank + diag
    post = BlockPosterior(small, big, prior_precision=0.5, n=2)
    P = torch.kron(small.matrix(), big.matrix()).double() / 2 + 0.5 * torch.eye(36).double()
    draws = post.sample(gen, n=20000).flatten(1).double()  # [S, r*d] row-major
    assert post.sample(gen).shape == (3, 12)
    emp = draws.T @ draws / len(draws)
    cov = torch.linalg.inv(P)
    assert float((emp - cov).norm() / cov.norm()) < 0.05
    sign, logdet = torch.linalg.slogdet(P)
    assert post.logdet() == pytest.approx(float(logdet), rel=1e-4)


def test_prior_precision_maximises_the_evidence_and_beats_the_extremes():
    model = tiny_lora(seed=2)
    factors = fit_kfac(model, random_items(24, seed=5))
    lam, curve = tune_prior(factors)
    assert 1e-4 < lam < 1e6 and math.isfinite(lam)
    best = evidence(factors, lam)
    assert best > evidence(factors, 1e-4) + 1 and best > evidence(factors, 1e6) + 1
    assert best >= max(row["log_evidence"] for row in curve) - 1e-6
    assert best >= evidence(factors, lam * 1.5) and best >= evidence(factors, lam / 1.5)


def test_predictives_soften_an_overconfident_map_and_reduce_to_it_under_a_strong_prior():
    model = tiny_lora(seed=4, scale=0.6)
    train, test = random_items(16, seed=6), random_items(8, seed=7)
    factors = fit_kfac(model, train)
    factors.prior_precision = tune_prior(factors)[0]
    map_probs = map_predictive(model, test).probs
    glm = glm_predictive(model, test, factors, link="mc", samples=4000)
    probit = glm_predictive(model, test, factors, link="probit")
    # Uncertainty about the logits pulls the confidence toward uniform.
    assert float(glm.probs.max(1).values.mean()) < float(map_probs.max(1).values.mean()) - 0.05
    assert float((glm.probs - probit.probs).abs().max()) < 0.1  # probit approximates the MC
    strong = glm_predictive(model, test, factors, prior_precision=1e9, link="mc")
    torch.testing.assert_close(strong.probs, map_probs, atol=1e-3, rtol=0)
    before = [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n]
    sampled = sampled_predictive(model, test, factors, prior_precision=1e9, samples=3)
    torch.testing.assert_close(sampled.probs, map_probs, atol=1e-3, rtol=0)
    after = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # MAP restored
    loose = sampled_predictive(model, test, factors, samples=4)
    assert float((loose.probs - map_probs).abs().max()) > 1e-3  # it does perturb the weights


def test_link_probs_reduce_to_softmax_for_small_variance_and_soften_for_large():
    mean = torch.tensor([[2.0, -1.0, 0.0]])
    tiny = torch.eye(2).unsqueeze(0) * 1e-6  # covariance of the 2 contrasts
    for link in ("mc", "probit"):
        torch.testing.assert_close(
            link_probs(mean, tiny, link), torch.softmax(mean, -1), atol=1e-3, rtol=0
        )
    wide = torch.eye(2).unsqueeze(0) * 25.0
    for link in ("mc", "probit"):
        probs = link_probs(mean, wide, link, samples=20000)
        assert float(probs.max()) < float(torch.softmax(mean, -1).max()) - 0.1
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    # Two classes, MC against the exact 1-D integral of the logistic over N(g, v).
    g, v = 1.5, 4.0
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    density = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    exact = float((torch.sigmoid(g + math.sqrt(v) * grid) * density).sum() * (grid[1] - grid[0]))
    mc = link_probs(torch.tensor([[0.0, g]]), torch.tensor([[[v]]]), "mc", samples=200000)
    assert float(mc[0, 1]) == pytest.approx(exact, abs=3e-3)


def test_metrics_against_hand_computed_values():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 1])
    # Bins (15 equal-width): 0.9 -> (0.8667, 0.9333], 0.8 -> (0.7333, 0.8], 0.7 and 0.6 apart.
    expected_ece = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.6)) / 4
    assert ece(probs, labels) == pytest.approx(expected_ece)
    assert nll(probs, labels) == pytest.approx(
        -(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.4)) / 4
    )
    assert brier(probs, labels) == pytest.approx((0.02 + 1.28 + 0.18 + 0.72) / 4)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert ece(perfect, torch.tensor([0, 1])) == 0.0
