"""bench quality's figures as pure functions: KL / top-1 / perplexity against a direct
computation, intervals, McNemar's exact test and the default-setting rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorafleet.bench import quality_stats as qs


def test_token_figures_equal_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(7, 50, generator=gen) * 3
    got = ref + 0.3 * torch.randn(7, 50, generator=gen)
    targets = torch.randint(0, 50, (7,), generator=gen)
    kl, same, nll, nll_ref = qs.token_figures(ref, got, targets)
    p = torch.softmax(ref.double(), -1)
    q = torch.softmax(got.double(), -1)
    direct = (p * (p.log() - q.log())).sum(-1)  # KL(P || Q), nats
    assert torch.allclose(kl.double(), direct, atol=1e-5)
    assert (kl > 0).all()
    assert same.tolist() == (ref.argmax(-1) == got.argmax(-1)).tolist()
    assert torch.allclose(nll.double(), -q.log()[torch.arange(7), targets], atol=1e-5)
    assert torch.allclose(nll_ref.double(), -p.log()[torch.arange(7), targets], atol=1e-5)
    # a setting against itself: KL 0, same top-1 everywhere, perplexity ratio 1
    kl0, same0, nll0, nll_ref0 = qs.token_figures(ref, ref.clone(), targets)
    assert kl0.abs().max() < 1e-6 and same0.all() and torch.equal(nll0, nll_ref0)


def test_summarise_pools_tokens_and_bootstraps_chunks():
    gen = torch.Generator().manual_seed(1)
    tally = qs.Tally()
    for _ in range(12):
        ref = torch.randn(20, 30, generator=gen)
        got = ref + 0.2 * torch.randn(20, 30, generator=gen)
        tally.add(*qs.token_figures(ref, got, torch.randint(0, 30, (20,), generator=gen)))
    out = qs.summarise(tally, boot=200, seed=0)
    kl = np.concatenate(tally.kl)
    assert out["tokens"] == tally.tokens == 240 and out["chunks"] == 12
    assert out["kl_mean"] == pytest.approx(kl.mean())
    assert out["kl_p99"] == pytest.approx(np.percentile(kl, 99))
    assert out["same_top1"] == pytest.approx(np.concatenate(tally.same).mean())
    ratio = math.exp(np.concatenate(tally.nll).mean() - np.concatenate(tally.nll_ref).mean())
    assert out["ppl_ratio"] == pytest.approx(ratio)
    for key in qs.STATS:
        lo, hi = out[f"{key}_ci"]
        assert lo <= out[key] <= hi, key
    assert out["kl_mean_pm"] == pytest.approx(1.96 * kl.std() / math.sqrt(len(kl) - 1))


def test_mcnemar_exact():
    ref = [True] * 10 + [False] * 5
    assert qs.mcnemar_exact(ref, ref) == {"only_reference": 0, "only_setting": 0, "p_value": 1.0}
    worse = [False] * 10 + [False] * 5  # the setting loses 10 rows, gains none
    test = qs.mcnemar_exact(ref, worse)
    assert test["only_reference"] == 10 and test["p_value"] == pytest.approx(2 / 2**10)
    assert qs.significantly_lower(ref, worse)
    better = [True] * 15  # gains 5: higher, so never "lower"
    assert not qs.significantly_lower(ref, better)
    one_off = [False] + [True] * 9 + [False] * 5  # loses 1 of 10: p = 1
    assert qs.mcnemar_exact(ref, one_off)["p_value"] == 1.0
    assert not qs.significantly_lower(ref, one_off)
    with pytest.raises(ValueError):
        qs.mcnemar_exact([True], [True, False])


def test_the_rule_picks_the_fastest_qualifying_setting():
    speeds = {"float32+none": 1.0, "bfloat16+none": 2.2, "bfloat16+int8": 2.6, "float32+int8": 1.6}
    kl = {
        "float32+none": 0.0,
        "bfloat16+none": 0.002,
        "bfloat16+int8": 0.004,
        "float32+int8": 0.003,
    }
    lower = dict.fromkeys(kl, False)
    verdict = qs.pick_default(kl, lower, q8_0_kl_mean=0.005, speeds=speeds)
    assert verdict.default == "bfloat16+int8"
    # worse KL than Q8_0: refused, the next fastest qualifying one wins
    verdict = qs.pick_default(kl, lower, q8_0_kl_mean=0.0035, speeds=speeds)
    assert verdict.default == "bfloat16+none"
    assert "llama.cpp Q8_0" in verdict.reasons["bfloat16+int8"]
    # significantly lower accuracy: refused even with a good KL
    verdict = qs.pick_default(kl, {**lower, "bfloat16+int8": True}, 0.005, speeds)
    assert verdict.default == "bfloat16+none"
    assert "significantly lower" in verdict.reasons["bfloat16+int8"]
    # nothing qualifies: float32 stays
    verdict = qs.pick_default(kl, dict.fromkeys(kl, True), 0.001, speeds)
    assert verdict.default == "float32+none"
    # no speed figure: cannot be ranked, so not picked
    verdict = qs.pick_default(kl, lower, 0.005, {"float32+none": 1.0})
    assert verdict.default == "float32+none" and "no speed" in verdict.reasons["bfloat16+int8"]
    assert qs.speed_score({"single_stream_vs_fp32": 2.0, "all_base_vs_fp32": 8.0}) == 4.0


def _tally(seed: int, chunks: int, noise: float) -> qs.Tally:
    gen = torch.Generator().manual_seed(seed)
    tally = qs.Tally()
    for _ in range(chunks):
        ref = torch.randn(25, 40, generator=gen)
        got = ref + noise * torch.randn(25, 40, generator=gen)
        tally.add(*qs.token_figures(ref, got, torch.randint(0, 40, (25,), generator=gen)))
    return tally


def test_an_earlier_summary_combines_with_per_token_pieces():
    old, new = _tally(2, 30, 0.2), _tally(3, 20, 0.2)
    whole = qs.Tally(*(a + b for a, b in zip(vars(old).values(), vars(new).values(), strict=True)))
    ref = qs.summarise(whole, boot=300)
    got = qs.combine_with_summary(
        qs.summarise(old, boot=300), qs.summarise(new, boot=300), np.concatenate(new.kl)
    )
    assert got["tokens"] == 50 * 25 and got["chunks"] == 50
    for key in ("kl_mean", "same_top1", "ppl_ratio", "kl_mean_pm"):  # exact
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
    assert got["kl_p99"] == pytest.approx(ref["kl_p99"], rel=0.1)  # halves alike: close
    for key in qs.STATS:  # the normal approximation: about as wide as the pooled bootstrap
        (lo, hi), (rlo, rhi) = got[f"{key}_ci"], ref[f"{key}_ci"]
        wide = 3 if key == "kl_p99" else 2  # a tail quantile of few tokens: rougher
        assert lo < got[key] < hi and 0.5 < (hi - lo) / (rhi - rlo) < wide, key
    # a summary half whose KL is twice as large: p99 between the halves' p99s
    kl = np.concatenate(new.kl)
    p99 = qs.scaled_mixture_p99(2 * np.percentile(kl, 99), kl, 0.5)
    assert np.percentile(kl, 99) < p99 < 2 * np.percentile(kl, 99)
    assert qs.scaled_mixture_p99(np.percentile(kl, 99), kl, 0.6) == pytest.approx(
        np.percentile(kl, 99), rel=0.02
    )
