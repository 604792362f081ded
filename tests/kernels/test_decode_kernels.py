"""lorafleet's decode-layer kernels (decode.cpp) against their torch statement (reference.py) and
transformers' modules: norms, SiLU * up, RoPE + KV write + attention; errors; the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorafleet import kernels
from lorafleet.kernels import build, reference

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def ext():
    module = kernels.extension()
    assert module is not None, kernels.unavailable_reason()
    return module


def close(got, want, dtype):
    """float32: to rounding; bfloat16: within one unit in the last place of the values."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = want.float().abs().max().clamp(min=1)
    assert ((got.float() - want.float()).abs().max() / scale) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_rms_norm_is_llamas_rmsnorm(ext, dtype, rows):
    torch.manual_seed(rows)
    module = LlamaRMSNorm(96, eps=1e-5)
    module.weight.data = torch.randn(96)
    module = module.to(dtype)
    x = (torch.randn(rows, 96) * 3).to(dtype)
    with torch.no_grad():
        want = module(x)
    got = ext.rms_norm(x, module.weight.detach(), 1e-5)
    close(got, want, dtype)
    if dtype == torch.bfloat16:  # the same two roundings as the module: bit for bit here
        assert torch.equal(got, want)
    assert torch.equal(reference.rms_norm(x, module.weight.detach(), 1e-5), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_residual_add_then_the_norm(ext, dtype):
    torch.manual_seed(1)
    h, delta = torch.randn(4, 64).to(dtype), torch.randn(4, 64).to(dtype)
    weight = torch.randn(64).to(dtype)
    h_before = h.clone()
    total, normed = ext.add_rms_norm(h, delta, weight, 1e-6)
    assert torch.equal(total, h + delta)  # one rounding of the sum, as torch's add
    assert torch.equal(h, h_before)  # the input is not written
    close(normed, reference.rms_norm(h + delta, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_silu_mul_is_llamas_act_times_up(ext, dtype, rows):
    torch.manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 80) * 4).to(dtype)
    gate, up = gate_up[:, :80], gate_up[:, 80:]
    want = F.silu(gate) * up
    got = ext.silu_mul(gate_up)
    close(got, want, dtype)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)


def rope_tables(positions, dim, dtype):
    """Llama's cos, sin [n, dim] for `positions` (base 10000, halves repeated)."""
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv[None]  # [n, dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [n, dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def transformers_attention(q, k, v, cos, sin, k_cache, v_cache, slots, positions, scale, window):
    """The same step the way the engine's torch path does it: transformers' apply_rotary_pos_emb,
    cache writes by indexing, SDPA with a key mask per row (GQA)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n, dim = q.shape[0], k_cache.shape[-1]
    qh = q.reshape(n, -1, dim).transpose(0, 1)  # [n, H*D] -> [H, n, D]
    kh = k.reshape(n, -1, dim).transpose(0, 1)  # [Hkv, n, D]
    qr, kr = apply_rotary_pos_emb(qh, kh, cos, sin, unsqueeze_dim=0)  # cos [n, D] per row
    k_cache[slots, :, positions] = kr.transpose(0, 1)  # [n, Hkv, D]
    v_cache[slots, :, positions] = v.reshape(n, -1, dim)
    out = []
    for i in range(n):
        p, slot = int(positions[i]), int(slots[i])
        key_pos = torch.arange(p + 1)
        mask = key_pos > p - window if window else torch.ones(p + 1, dtype=torch.bool)
        o = F.scaled_dot_product_attention(
            qr[:, i : i + 1].float(),  # [H, 1, D]
            k_cache[slot, :, : p + 1].float(),  # [Hkv, p + 1, D]
            v_cache[slot, :, : p + 1].float(),
            attn_mask=mask[None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        out.append(o.transpose(0, 1).reshape(1, -1))  # [H, 1, D] -> [1, H*D]
    return torch.cat(out).to(q.dtype)


def attention_case(dtype, heads, kv_heads, seed=0):
    """q/k/v as column blocks of one fused product (row stride > width), caches with history."""
    g = torch.Generator().manual_seed(seed)
    n, dim, slots_total, length = 4, 32, 6, 40
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    k_cache = torch.randn(slots_total, kv_heads, length, dim, generator=g).to(dtype)
    v_cache = torch.randn(slots_total, kv_heads, length, dim, generator=g).to(dtype)
    slots, positions = torch.tensor([2, 0, 5, 1]), torch.tensor([5, 0, 39, 17])
    cos, sin = rope_tables(positions, dim, dtype)
    return (q, k, v, cos, sin, k_cache, v_cache, slots, positions)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("window", [None, 4])
def test_decode_attention_is_rope_cache_write_and_sdpa(ext, dtype, heads, kv_heads, window):
    args = attention_case(dtype, heads, kv_heads, seed=heads)
    ours = [a.clone() for a in args]
    theirs = [a.clone() for a in args]
    o = kernels.decode_attention(*ours, 0.2, window)
    want = transformers_attention(*theirs, 0.2, window)
    close(o, want, dtype)
    for cache in (5, 6):  # k_cache, v_cache: the written rows, and nothing else changed
        close(ours[cache], theirs[cache], dtype)
    assert torch.equal(ours[6], theirs[6])  # values are copied, not computed
    close(o, reference.decode_attention(*[a.clone() for a in args], 0.2, window or 0), dtype)


def test_decode_attention_rows_do_not_depend_on_their_batch(ext):
    args = attention_case(torch.float32, 9, 3)
    together = kernels.decode_attention(*[a.clone() for a in args], 0.125)
    for i in range(4):
        q, k, v, cos, sin, kc, vc, slots, pos = (a.clone() for a in args)
        one = kernels.decode_attention(
            q[i : i + 1],
            k[i : i + 1],
            v[i : i + 1],
            cos[i : i + 1],
            sin[i : i + 1],
            kc,
            vc,
            slots[i : i + 1],
            pos[i : i + 1],
            0.125,
        )
        assert torch.equal(one[0], together[i])


def test_bad_inputs_raise_one_line_errors(ext):
    q, k, v, cos, sin, kc, vc, slots, pos = attention_case(torch.float32, 9, 3)
    with pytest.raises(RuntimeError, match="out of the cache"):
        ext.decode_attention(q, k, v, cos, sin, kc, vc, slots, pos + 1, 0.1, 0)
    with pytest.raises(RuntimeError, match="multiple of"):
        ext.decode_attention(q[:, :-32], k, v, cos, sin, kc, vc, slots, pos, 0.1, 0)
    with pytest.raises(RuntimeError, match="cos, sin"):
        ext.decode_attention(q, k, v, cos.double(), sin, kc, vc, slots, pos, 0.1, 0)
    with pytest.raises(RuntimeError, match="w must be"):
        ext.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.silu_mul(torch.randn(2, 8).double())


def test_without_the_extension_the_reference_runs(monkeypatch):
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    kernels.reset()
    assert not kernels.decode_ready(torch.float32, 64)
    x, w = torch.randn(2, 16), torch.randn(16)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    gate_up = torch.randn(2, 32)
    assert torch.equal(kernels.silu_mul(gate_up), reference.silu_mul(gate_up))
    args = attention_case(torch.float32, 9, 3)
    ours = kernels.decode_attention(*[a.clone() for a in args], 0.125)
    close(ours, transformers_attention(*[a.clone() for a in args], 0.125, None), torch.float32)


def test_decode_ready_needs_a_head_dim_of_whole_vectors(ext):
    assert kernels.decode_ready(torch.float32, 64) and kernels.decode_ready(torch.bfloat16, 128)
    assert not kernels.decode_ready(torch.float32, 24)
    assert not kernels.decode_ready(torch.float16, 64)
