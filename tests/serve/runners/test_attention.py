"""The decode attention kernels: grouped matmuls against SDPA (GQA, masks, cache views)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from serve_helpers import record_rows, tiny_base

import lorafleet.serve.runners.base as runner_base
from lorafleet.serve import Engine, SamplingParams
from lorafleet.serve.runners.base import GROUPED_MIN_ROWS, grouped_decode_attention


def sdpa_reference(q, k, v, mask, scale):
    """SDPA with one query per row, GQA by repeating KV heads (what the runner did before)."""
    qd = q.unsqueeze(2)  # [n, H, D] -> [n, H, 1, D]
    o = F.scaled_dot_product_attention(
        qd, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


def case(rows: int, heads: int, kv_heads: int, length: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(rows + 4, kv_heads, length + 8, 16, generator=g).to(dtype)
    k = cache[1 : rows + 1, :, 2 : length + 2]  # a strided view, as the runner reads the cache
    v = cache[:rows, :, :length].flip(0)
    q = torch.randn(rows, heads, 16, generator=g).to(dtype)
    lens = torch.randint(1, length + 1, (rows, 1), generator=g)
    mask = torch.arange(length)[None, :] < lens  # [n, L]: each row sees its first lens keys
    return q, k, v, mask


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3), (8, 1)])
def test_grouped_decode_attention_equals_sdpa_in_float32(heads, kv_heads):
    q, k, v, mask = case(5, heads, kv_heads, 11, torch.float32)
    got = grouped_decode_attention(q, k, v, mask, 0.25)
    want = sdpa_reference(q, k, v, mask, 0.25)
    assert got.shape == (5, heads, 16)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_grouped_decode_attention_reads_only_unmasked_keys():
    q, k, v, mask = case(3, 6, 2, 9, torch.float32)
    mask[:, :4], mask[:, 4:] = True, False  # keys 4.. hidden: changing them changes nothing
    before = grouped_decode_attention(q, k, v, mask, 0.3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:] = 1e4
    v2[:, :, 4:] = -1e4
    torch.testing.assert_close(grouped_decode_attention(q, k2, v2, mask, 0.3), before)
    # a sliding window's mask (keys before the window hidden) is just another mask
    window = mask.clone()
    window[:, :2] = False
    got = grouped_decode_attention(q, k, v, window, 0.3)
    torch.testing.assert_close(got, sdpa_reference(q, k, v, window, 0.3), atol=1e-6, rtol=1e-5)


def test_grouped_decode_attention_in_bfloat16_is_close_to_float32():
    q, k, v, mask = case(8, 9, 3, 40, torch.bfloat16)
    got = grouped_decode_attention(q, k, v, mask, 0.125)
    assert got.dtype == torch.bfloat16
    want = sdpa_reference(q.float(), k.float(), v.float(), mask, 0.125)
    assert (got.float() - want).abs().max() < 0.03  # bfloat16 inputs, float32 softmax


def test_engine_decode_batches_use_the_grouped_path_and_match_one_by_one(monkeypatch, tokenizer):
    """Without the decode-layer kernels (runner.fast_decode off: a machine with no compiler),
    decode steps of >= GROUPED_MIN_ROWS rows go through the grouped kernel, and a batch gives
    the tokens each request gets alone (single rows: SDPA)."""
    calls = record_rows(monkeypatch, runner_base, "grouped_decode_attention")
    engine = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=4)
    engine.runner.fast_decode = False
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2], [7, 7, 1], [3, 4, 5, 6, 8, 10], [11]]
    alone = [engine.generate([(p, None, params)])[0].token_ids for p in prompts]
    assert not calls  # one row at a time: SDPA
    batched = [o.token_ids for o in engine.generate([(p, None, params) for p in prompts])]
    assert calls and min(calls) >= GROUPED_MIN_ROWS
    assert batched == alone
