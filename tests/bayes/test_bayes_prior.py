"""Prior kinds: evidence against a dense brute-force search, the centred prior's defining effect,
B-only posteriors, saved settings and the CLI's --prior."""

from __future__ import annotations

import json
import math

import pytest
import torch
from bayes_helpers import random_items, tiny_lora
from safetensors.torch import save_file

from lorafleet.adapters.lora_keys import peft_key, strip_prefix
from lorafleet.bayes import fit_kfac, load_factors, save_factors, tune_prior
from lorafleet.bayes.capture import lora_layers, lora_weight
from lorafleet.bayes.prior import AdapterPosterior, evidence, group_lams, posterior


def _dense_terms(factors, lam: float) -> dict:
    """Per block: -1/2 [lam ||theta_b||^2 + logdet(kron(S, F)/n + lam I) - P_b log lam] from
    the explicit dense block precision."""
    out = {}
    for name, part, small, big in factors.blocks():
        P = torch.kron(small.matrix().double(), big.matrix().double()) / factors.n
        P = P + lam * torch.eye(P.shape[0], dtype=torch.float64)
        logdet = float(torch.linalg.slogdet(P)[1])
        norm = factors.block_sq[(name, part)]
        out[(name, part)] = -0.5 * (lam * norm + logdet - P.shape[0] * math.log(lam))
    return out


def _dense_evidence(factors, lams: dict[str, float], terms: dict) -> float:
    """The log evidence with precision lams[part] on each part, from dense per-block terms
    (terms[lam] as _dense_terms gives them)."""
    return factors.log_lik + sum(terms[lams[p]][(n, p)] for n, p, _, _ in factors.blocks())


def test_tuned_precisions_match_a_brute_force_grid_search_of_the_dense_evidence():
    model = tiny_lora(seed=2)
    factors = fit_kfac(model, random_items(24, seed=5))
    lam, _ = tune_prior(factors, prior="parts")
    tuned = group_lams(factors, lam)
    grid = [10.0**x for x in torch.linspace(-3, 4, 71).tolist()]  # steps of 10^0.1
    terms = {g: _dense_terms(factors, g) for g in [*grid, *tuned.values()]}
    # Brute force over the 2-D grid (lam_A, lam_B), each point summed over dense blocks.
    scores = {(a, b): _dense_evidence(factors, {"A": a, "B": b}, terms) for a in grid for b in grid}
    (best_a, best_b), best = max(scores.items(), key=lambda kv: kv[1])
    assert abs(math.log10(tuned["A"] / best_a)) <= 0.1 + 1e-6
    assert abs(math.log10(tuned["B"] / best_b)) <= 0.1 + 1e-6
    at_tuned = _dense_evidence(factors, tuned, terms)
    assert at_tuned >= best - 1e-6
    assert evidence(factors, lam) == pytest.approx(at_tuned, rel=1e-5)
    # One shared precision ("zero") is the brute force's diagonal.
    lam0, _ = tune_prior(factors, prior="zero")
    diag = max(grid, key=lambda g: _dense_evidence(factors, {"A": g, "B": g}, terms))
    assert abs(math.log10(lam0 / diag)) <= 0.1 + 1e-6


def _from_random_init(scale: float, seed: int = 0):
    """A tiny LoRA 'barely trained' from a random A init of `scale` x kaiming's bound: A = A0 +
    a small step, B a small step from 0. Returns (model, {(module, part): initial weight})."""
    model = tiny_lora(seed=2)
    gen = torch.Generator().manual_seed(100 + seed)
    init = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            A, B = lora_weight(layer, "A"), lora_weight(layer, "B")
            bound = scale / A.shape[1] ** 0.5
            A0 = (torch.rand(A.shape, generator=gen) * 2 - 1) * bound
            A.copy_(A0 + 0.5 * torch.randn(A.shape, generator=gen) / A.shape[1] ** 0.5)
            B.copy_(0.1 * torch.randn(B.shape, generator=gen))
            init[(strip_prefix(name), "A")] = A0
            init[(strip_prefix(name), "B")] = torch.zeros_like(B)
    return model, init


def test_centred_prior_is_unmoved_by_a_large_random_init_where_the_zero_prior_collapses():
    items = random_items(24, seed=5)
    lams = {}
    for scale in (1.0, 10.0):
        model, init = _from_random_init(scale)
        factors = fit_kfac(model, items, init=init)
        # The centred prior sees only the distance from the init, not the init's own norm.
        assert sum(factors.init_sq.values()) < 0.1 * factors.theta_sq or scale == 1.0
        lams[scale] = {p: tune_prior(factors, prior=p)[0] for p in ("zero", "init")}
    assert lams[10.0]["zero"] < lams[1.0]["zero"] / 5  # ||A0||^2 x 100 drags lam down
    assert 0.5 < lams[10.0]["init"] / lams[1.0]["init"] < 2  # the centred optimum stays
    assert lams[10.0]["init"] > 10 * lams[10.0]["zero"]


def test_b_only_posterior_covers_the_b_blocks_alone_and_ignores_a():
    model, init = _from_random_init(10.0)
    factors = fit_kfac(model, random_items(16, seed=3), init=init)
    lam, _ = tune_prior(factors, prior="b-only")
    post = AdapterPosterior(factors, lam)
    assert {part for _, part in post.blocks} == {"B"}
    assert len(post.blocks) == len(factors.modules)
    # The B-only evidence equals the dense one with A left out (no A term at all).
    B_only = factors.log_lik
    for name, part, small, big in factors.blocks():
        if part == "B":
            P = torch.kron(small.matrix().double(), big.matrix().double()) / factors.n
            P = P + lam * torch.eye(P.shape[0], dtype=torch.float64)
            logdet = float(torch.linalg.slogdet(P)[1])
            norm = factors.block_sq[(name, part)]
            B_only -= 0.5 * (lam * norm + logdet - P.shape[0] * math.log(lam))
    assert evidence(factors, lam) == pytest.approx(B_only, rel=1e-5)
    # A's norm does not enter: growing it leaves the B-only optimum where it was.
    factors.block_sq = {k: v * (100.0 if k[1] == "A" else 1.0) for k, v in factors.block_sq.items()}
    assert tune_prior(factors, prior="b-only")[0] == pytest.approx(lam, rel=1e-6)


def test_prior_kind_ratios_and_norms_survive_save_and_load(tmp_path):
    model, init = _from_random_init(3.0)
    factors = fit_kfac(model, random_items(8, seed=1), init=init)
    lam, _ = tune_prior(factors, prior="parts")
    factors.prior_precision = lam
    save_factors(tmp_path, factors)
    back = load_factors(tmp_path, check_adapter=False)
    assert back.prior == "parts" and back.ratios == pytest.approx(factors.ratios)
    assert back.block_sq == pytest.approx(factors.block_sq)
    assert back.init_sq == pytest.approx(factors.init_sq)
    assert group_lams(back, lam) == pytest.approx(group_lams(factors, lam))
    assert posterior(back).logdet() == pytest.approx(posterior(factors).logdet(), rel=1e-5)


def test_unknown_prior_and_init_without_record_are_one_line_errors():
    from lorafleet.errors import LorafleetError

    factors = fit_kfac(tiny_lora(seed=1), random_items(4, seed=1))
    with pytest.raises(LorafleetError, match="prior must be one of"):
        tune_prior(factors, prior="flat")
    with pytest.raises(LorafleetError, match="lora_init.safetensors"):
        tune_prior(factors, prior="init")


def write_init(adapter_dir, init: dict) -> None:
    """lora_init.safetensors as a trainer records it: PEFT keys of the initial A and B."""
    save_file(
        {peft_key(m, part): w.contiguous() for (m, part), w in init.items()},
        str(adapter_dir / "lora_init.safetensors"),
    )


def test_read_init_maps_peft_keys_to_modules(tmp_path):
    from lorafleet.bayes.io import read_init

    model, init = _from_random_init(2.0)
    write_init(tmp_path, init)
    back = read_init(tmp_path)
    assert set(back) == set(init)
    assert all(torch.equal(back[k], init[k]) for k in init)
    factors = fit_kfac(model, random_items(4, seed=1), init=back)
    assert set(factors.init_sq) == set(factors.block_sq)
    assert read_init(tmp_path / "nowhere") is None


def test_calibrate_cli_reports_the_prior_and_refuses_init_without_a_record(
    run_cli, tiny_base_dir, tmp_path
):
    from test_bayes_cli import _adapter, _common

    data = tmp_path / "reviews.jsonl"
    words = ["great", "awful", "lovely", "dull", "superb", "bad"]
    rows = [
        {"text": f"The film was {w}.", "label": "good" if i % 2 else "bad"}
        for i, w in enumerate(words)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = _adapter(tiny_base_dir, tmp_path / "lora")
    code, _, err = run_cli("calibrate", *_common(tiny_base_dir, adapter, data), "--prior", "init")
    assert code == 2 and "lora_init.safetensors" in err and "Traceback" not in err
    code, out, err = run_cli(
        "calibrate",
        *_common(tiny_base_dir, adapter, data),
        "--prior",
        "parts",
        "--json",
        str(tmp_path / "cal.json"),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "cal.json").read_text())
    assert report["prior"] == "parts" and set(report["group_precisions"]) == {"A", "B"}
    assert isinstance(report["warnings"], list)
    assert json.loads((adapter / "laplace.json").read_text())["prior"] == "parts"


def test_b_layers_tunes_one_precision_per_module_each_at_its_dense_optimum():
    model, init = _from_random_init(3.0)
    factors = fit_kfac(model, random_items(16, seed=3), init=init)
    lam, _ = tune_prior(factors, prior="b-layers")
    lams = group_lams(factors, lam)
    assert set(lams) == {f"B {name}" for name in factors.modules}
    grid = [10.0**x for x in torch.linspace(-3, 4, 71).tolist()]
    terms = {g: _dense_terms(factors, g) for g in grid}
    for name in factors.modules:
        best = max(grid, key=lambda g, name=name: terms[g][(name, "B")])
        assert abs(math.log10(lams[f"B {name}"] / best)) <= 0.1 + 1e-6
    assert {part for _, part in AdapterPosterior(factors, lam).blocks} == {"B"}


def test_an_optimum_on_the_edge_of_the_search_range_is_flagged():
    factors = fit_kfac(tiny_lora(seed=1), random_items(8, seed=1))
    tune_prior(factors, prior="b-only")
    assert factors.edge == []
    # B at its init (norm 0): the evidence only grows with lam, up to the range's top.
    factors.block_sq = {k: 0.0 if k[1] == "B" else v for k, v in factors.block_sq.items()}
    lam, _ = tune_prior(factors, prior="b-only")
    assert factors.edge == ["B"] and lam > 1e4
