"""The sampler's shortcuts: greedy rows skip filtering, top-p ranks a candidate set exactly."""

from __future__ import annotations

import pytest
import torch

from lorafleet.serve import sampler
from lorafleet.serve.sampler import filter_logits, sample, top_p_drop
from lorafleet.serve.sequence import SamplingParams, Sequence


def full_sort_drop(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The reference: sort the whole vocabulary (candidates = V)."""
    return top_p_drop(x, top_p, candidates=x.shape[-1])


@pytest.mark.parametrize("scale", [1.0, 4.0, 12.0])  # flat to peaked distributions
def test_top_p_over_candidates_equals_the_full_sort(scale):
    g = torch.Generator().manual_seed(int(scale))
    x = scale * torch.randn(6, 5000, generator=g)
    top_p = torch.tensor([0.1, 0.5, 0.8, 0.9, 0.95, 0.999])
    want = full_sort_drop(x, top_p)
    for candidates in (16, 256, 1024):
        got = top_p_drop(x, top_p, candidates=candidates)
        assert torch.equal(got, want)
    assert (~want).sum(-1).min() >= 1  # the first token always stays


def test_top_p_falls_back_to_the_full_sort_when_the_nucleus_is_wide():
    x = torch.zeros(2, 3000)  # uniform: the 0.9 nucleus holds 2,700 tokens
    x[1, 0] = 50.0  # one token holds nearly all the mass
    top_p = torch.tensor([0.9, 0.9])
    got = top_p_drop(x, top_p, candidates=64)
    assert torch.equal(got, full_sort_drop(x, top_p))
    assert int((~got[0]).sum()) == 2700 and int((~got[1]).sum()) == 1


def test_top_k_then_top_p_over_candidates():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(4, 4000, generator=g)
    args = (torch.tensor([0.7, 1.0, 1.3, 1.0]), torch.tensor([50, 0, 5, 2000]))
    top_p = torch.tensor([0.9, 0.8, 1.0, 0.95])
    got = filter_logits(logits, *args, top_p)
    x = logits / args[0][:, None]
    k = args[1].clamp(min=1)
    k = torch.where(args[1] > 0, k, torch.full_like(k, 4000))
    kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    x = x.masked_fill(x < kth, float("-inf"))
    want = x.masked_fill(full_sort_drop(x, top_p), float("-inf"))
    assert torch.equal(got, want)


def seq(i: int, **params) -> Sequence:
    return Sequence(i, [1, 2, 3], None, SamplingParams(**params))


def test_greedy_rows_never_filter(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a greedy batch must not sort, rank or filter")

    for name in ("filter_logits", "top_p_drop"):
        monkeypatch.setattr(sampler, name, boom)
    logits = torch.randn(3, 100)
    seqs = [seq(i, temperature=0.0, top_p=0.5, top_k=3) for i in range(3)]
    assert sample(logits, seqs, None) == logits.argmax(-1).tolist()


def test_rows_without_top_p_or_top_k_never_sort(monkeypatch):
    real_sort, real_topk = torch.sort, torch.topk
    calls = []
    monkeypatch.setattr(torch, "sort", lambda *a, **k: calls.append("sort") or real_sort(*a, **k))
    monkeypatch.setattr(torch, "topk", lambda *a, **k: calls.append("topk") or real_topk(*a, **k))
    logits = 5 * torch.randn(2, 3000, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    tokens = sample(logits, [seq(0, temperature=0.8), seq(1, temperature=1.0)], gen)
    assert len(tokens) == 2 and not calls
    sample(logits, [seq(0, temperature=0.8, top_p=0.9)], gen)
    assert calls == ["topk"]  # the candidate set, not a sort of the vocabulary
