"""Merges as pure functions over small tensors: exactness, optimal truncation, TIES / DARE."""

from __future__ import annotations

import pytest
import torch

from lorafleet.compose import (
    Factors,
    MergeError,
    combine_dense,
    compact,
    merge_factors,
    svd_factors,
)
from lorafleet.compose.merge import module_seed


def _factors(seed: int, d_out=12, d_in=10, r=3) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(
        B=torch.randn(d_out, r, generator=g).double(), A=torch.randn(r, d_in, generator=g).double()
    )


def test_linear_is_the_exact_weighted_sum_with_the_fewest_ranks():
    f = _factors(0)
    out, report = merge_factors([{"m": f}, {"m": f}], [0.7, -0.4], "linear")
    assert out["m"].rank == 3  # the same adapter twice: rank 3, not 6
    assert torch.allclose(out["m"].dense(), 0.3 * f.dense(), atol=1e-12)
    assert report["relative_error"] < 1e-12


def test_cat_concatenates_ranks_and_a_missing_module_contributes_zero():
    f, g, h = _factors(0), _factors(1, r=5), _factors(2)
    out, _ = merge_factors([{"m": f, "n": h}, {"m": g}], [1.0, -2.0], "cat")
    assert out["m"].rank == 8 and out["n"].rank == 3
    assert torch.allclose(out["m"].dense(), f.dense() - 2 * g.dense(), atol=1e-12)
    assert torch.allclose(out["n"].dense(), h.dense(), atol=1e-12)


def test_svd_error_is_the_optimal_truncation_error():
    f, g = _factors(0), _factors(1)
    out, report = merge_factors([{"m": f}, {"m": g}], [1.0, 0.5], "svd", rank=2)
    exact = f.dense() + 0.5 * g.dense()
    s = torch.linalg.svdvals(exact)
    optimal = float(s[2:].norm() / s.norm())
    got = float((out["m"].dense() - exact).norm() / exact.norm())
    assert out["m"].rank == 2
    assert got == pytest.approx(optimal, rel=1e-9)
    assert report["relative_error"] == pytest.approx(optimal, rel=1e-9)
    assert optimal > 0.05  # a real truncation, not a trivially exact case


def test_compact_and_svd_factors_agree():
    f = _factors(3, r=4)
    a, err_a, _ = compact(f, 2)
    b, err_b, _ = svd_factors(f.dense(), 2)
    assert torch.allclose(a.dense(), b.dense(), atol=1e-10)
    assert err_a == pytest.approx(err_b, rel=1e-9)


def _ties_reference(deltas, weights, density):
    """TIES by hand: keep the top-k magnitudes of each (sign-folded) task vector, elect the sign
    of the summed trimmed vectors, average the weighted entries that agree."""
    trimmed = []
    for d, w in zip(deltas, weights, strict=True):
        t = d if w >= 0 else -d
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().flatten().argsort(descending=True)[:k]] = True
        trimmed.append(t * keep.view(t.shape))
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = stack.sign() == sign
    weighted = stack * torch.tensor([abs(w) for w in weights]).double().view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_matches_a_direct_dense_reference_with_a_negated_task():
    deltas = [_factors(i).dense() for i in range(3)]
    weights = [1.0, 0.5, -0.8]
    got = combine_dense(deltas, weights, "ties", density=0.4)
    assert torch.allclose(got, _ties_reference(deltas, weights, 0.4), atol=1e-12)


def test_magnitude_prune_keeps_the_top_fraction_of_each_delta():
    deltas = [_factors(i).dense() for i in range(2)]
    got = combine_dense(deltas, [1.0, 0.0], "magnitude_prune", density=0.25)
    k = int(0.25 * deltas[0].numel())
    assert int((got != 0).sum()) == k
    assert torch.allclose(got[got != 0], deltas[0][got != 0])


def test_dare_linear_drops_and_rescales_and_is_seeded():
    deltas = [_factors(i).dense() for i in range(2)]
    weights = [1.0, -0.5]
    got = combine_dense(deltas, weights, "dare_linear", density=0.3, seed=7)
    # Reference: the same Bernoulli masks drawn by hand from the same seed.
    torch.manual_seed(7)
    masks = [torch.bernoulli(torch.full_like(d, 0.3)) for d in deltas]
    parts = zip(deltas, weights, masks, strict=True)
    ref = sum(abs(w) * (d if w >= 0 else -d) * m / 0.3 for d, w, m in parts)
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.equal(got, combine_dense(deltas, weights, "dare_linear", density=0.3, seed=7))
    assert not torch.equal(got, combine_dense(deltas, weights, "dare_linear", density=0.3, seed=8))
    # Averaged over many seeds DARE is unbiased: it tends to the linear merge.
    mean = sum(
        combine_dense(deltas, weights, "dare_linear", density=0.3, seed=s) for s in range(400)
    )
    linear = deltas[0] - 0.5 * deltas[1]
    assert float((mean / 400 - linear).norm() / linear.norm()) < 0.1


def test_dare_ties_at_density_one_is_ties_without_pruning():
    deltas = [_factors(i).dense() for i in range(3)]
    w = [1.0, 1.0, 1.0]
    assert torch.allclose(
        combine_dense(deltas, w, "dare_ties", density=1.0),
        combine_dense(deltas, w, "ties", density=1.0),
    )


def test_dense_merge_is_factored_to_the_sum_of_ranks_with_its_error_reported():
    f, g = _factors(0), _factors(1)
    out, report = merge_factors([{"m": f}, {"m": g}], [1.0, 1.0], "ties", density=0.5)
    assert out["m"].rank == 6
    dense = combine_dense(
        [f.dense(), g.dense()], [1.0, 1.0], "ties", density=0.5, seed=module_seed(0, "m")
    )
    err = float((out["m"].dense() - dense).norm() / dense.norm())
    assert report["relative_error"] == pytest.approx(err, rel=1e-6)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"method": "mean"}, "unknown merge method"),
        ({"method": "ties", "density": 0.0}, "--density"),
        ({"method": "ties", "density": 1.5}, "--density"),
        ({"method": "ties", "majority_sign": "vote"}, "--majority-sign"),
        ({"method": "linear", "rank": 2}, "--rank does not apply"),
        ({"method": "linear", "weights": [float("nan")]}, "finite"),
    ],
)
def test_bad_recipes_are_one_line_errors(kw, needle):
    weights = kw.pop("weights", [1.0])
    with pytest.raises(MergeError, match=needle) as info:
        merge_factors([{"m": _factors(0)}], weights, **kw)
    assert "\n" not in str(info.value)


def test_modules_of_different_shapes_are_refused():
    with pytest.raises(MergeError, match="different base"):
        merge_factors([{"m": _factors(0)}, {"m": _factors(1, d_out=8)}], [1, 1], "linear")
