"""Issue 29's Laplace-LoRA defaults: the fit-set size, the prior's Adam search, and predictives
over the `last_layer` subset (only lm_head's answer rows carry uncertainty)."""

from __future__ import annotations

import math

import pytest
import torch
from bayes_helpers import exact_jacobians, random_items, tiny_lora

from lorafleet.bayes import (
    CalibrateConfig,
    LaplaceConfig,
    fit_kfac,
    glm_predictive,
    load_factors,
    map_predictive,
    sampled_predictive,
    save_factors,
    tune_prior,
)
from lorafleet.bayes.config import FIT_ROWS
from lorafleet.bayes.posterior import BlockPosterior
from lorafleet.bayes.prior import ADAM_STEPS, evidence, group_slope
from lorafleet.errors import LorafleetError

HEAD = ("q_proj", "v_proj", "lm_head")


def test_defaults_are_the_official_codes():
    fit, tune = LaplaceConfig(), CalibrateConfig()
    assert (fit.kfac, fit.subset, fit.labels) == ("expand", "all", "exact")
    assert (tune.prior, tune.evidence, tune.search, tune.prior_steps) == (
        "zero",
        "mode",
        "adam",
        100,
    )
    assert ADAM_STEPS == 100
    with pytest.raises(LorafleetError, match="search must be one of"):
        CalibrateConfig(search="newton")
    with pytest.raises(LorafleetError, match="prior_steps"):
        CalibrateConfig(prior_steps=0)


def test_calibrate_fits_on_up_to_1000_training_rows_by_default():
    import typer.main

    from lorafleet.cli.app import app

    command = typer.main.get_command(app).commands["calibrate"]
    option = next(p for p in command.params if p.name == "train_limit")
    assert option.default == FIT_ROWS == 1000
    assert "whole" in option.help  # fewer rows than the limit: the whole split


def test_evidence_slope_is_the_derivative_in_log_lam():
    factors = fit_kfac(tiny_lora(seed=2), random_items(12, seed=5), LaplaceConfig(threshold=16))
    assert any(not m.A_in.is_dense for m in factors.modules.values())  # low-rank + diagonal too
    factors.prior = "zero"
    for lam in (0.05, 1.0, 30.0):
        h = 1e-2  # the evidence sums float32 terms: smaller steps difference round-off
        up, down = evidence(factors, lam * math.exp(h)), evidence(factors, lam * math.exp(-h))
        numeric = (up - down) / (2 * h)
        assert group_slope(factors, "zero", "all", lam, "mode") == pytest.approx(numeric, rel=1e-3)
    # The trace of a low-rank + diagonal block's covariance against the dense inverse.
    name, part, small, big = next(b for b in factors.blocks() if not b[3].is_dense)
    block = BlockPosterior(small, big, 0.7, factors.n)
    P = torch.kron(small.matrix().double(), big.matrix().double()) / factors.n
    P += 0.7 * torch.eye(P.shape[0], dtype=torch.float64)
    assert block.trace_cov() == pytest.approx(float(torch.linalg.inv(P).trace()), rel=1e-5)


def test_adam_reaches_the_grid_optimum_within_its_steps_and_flags_it_otherwise():
    factors = fit_kfac(tiny_lora(seed=2), random_items(16, seed=5))
    grid, _ = tune_prior(factors, prior="zero", search="grid")
    adam, curve = tune_prior(factors, prior="zero", search="adam")
    assert abs(math.log(grid)) < 8  # within Adam's reach from lam = 1 in 100 steps of 0.1
    assert adam == pytest.approx(grid, rel=0.05) and factors.edge == []
    assert {row["group"] for row in curve} == {"all"}
    short, _ = tune_prior(factors, prior="zero", search="adam", steps=3)
    assert abs(math.log(short)) <= 0.3 + 1e-6 and factors.edge == ["all"]  # still moving
    with pytest.raises(LorafleetError, match="search must be one of"):
        tune_prior(factors, search="newton")


def test_last_layer_predictive_uses_only_the_answer_rows_jacobian_and_round_trips(tmp_path):
    model = tiny_lora(seed=4, targets=HEAD, scale=0.5)
    train, test = random_items(12, seed=6, classes=3), random_items(4, seed=7, classes=3)
    factors = fit_kfac(model, train, LaplaceConfig(subset="last_layer", batch_size=4))
    (head,) = factors.modules
    lam = 0.8
    factors.prior_precision = lam
    save_factors(tmp_path, factors)
    loaded = load_factors(tmp_path, check_adapter=False)
    assert loaded.config["rows"] == {head: list(train[0].classes)}
    pred = glm_predictive(model, test, loaded, link="probit")
    # Oracle: exact Jacobians of the head's A and of B's answer rows, dense KFAC covariance.
    m = factors.modules[head]
    blocks = []
    for small, big in ((m.A_out, m.A_in), (m.B_in, m.B_out)):  # the A block, then B's
        P = torch.kron(small.matrix(), big.matrix()).double() / factors.n
        blocks.append(torch.linalg.inv(P + lam * torch.eye(P.shape[0], dtype=torch.float64)))
    rows = torch.tensor(train[0].classes)
    for i, item in enumerate(test):
        jac = exact_jacobians(model, item)
        JA = jac[(head, "A")].double()  # [C, r*d_in]
        JB = jac[(head, "B")].double().reshape(3, 4, -1)[:, :, rows].flatten(1)  # [C, r*C]
        D = torch.tensor([[-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)  # contrasts
        cov = D @ (JA @ blocks[0] @ JA.T + JB @ blocks[1] @ JB.T) @ D.T
        torch.testing.assert_close(pred.cov[i].double(), cov, rtol=1e-3, atol=1e-6)
    # Weight samples perturb only the answer rows of B, and the weights come back.
    B = model.get_base_model().get_output_embeddings().lora_B["default"].weight
    before = B.detach().clone()
    sampled = sampled_predictive(model, test, loaded, prior_precision=1e9, samples=2)
    torch.testing.assert_close(sampled.probs, map_predictive(model, test).probs, atol=1e-3, rtol=0)
    assert torch.equal(B.detach(), before)
    other = [it.__class__(it.ids, (40, 41, 42), it.label) for it in test]
    with pytest.raises(LorafleetError, match="answer tokens"):
        glm_predictive(model, other, loaded)
