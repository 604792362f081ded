"""The decode-layer kernels' semantics in torch ops (decode.cpp's header): what the tests hold
the compiled ops to, and what `kernels` runs where the extension is not built."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm of x [M, d] with weight [d] (x's dtype)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, rms_norm(s)) with s = h + delta, [M, d] each."""
    s = h + delta
    return s, rms_norm(s, weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up [M, 2I] (gate the first I columns) -> [M, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [n, heads, D] rotated by cos, sin [n, D] (rotate_half form), computed in float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)  # [n, heads, D]
    return (xf * cos.float()[:, None] + rotated * sin.float()[:, None]).to(x.dtype)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    positions: Tensor,
    scale: float,
    window: int,
) -> Tensor:
    """RoPE on q [n, H*D] and k [n, Hkv*D], k and v [n, Hkv*D] into the caches [S, Hkv, L, D]
    at (slots[i], positions[i]), then each row's attention over its keys (a window > 0 keeps
    the last `window`) -> o [n, H*D]."""
    n, dim = q.shape[0], k_cache.shape[-1]
    kv_heads = k_cache.shape[1]
    qr = rope(q.reshape(n, -1, dim), cos, sin)  # [n, H*D] -> [n, H, D]
    kr = rope(k.reshape(n, kv_heads, dim), cos, sin)  # [n, Hkv, D]
    out = []
    for i in range(n):
        slot, p = int(slots[i]), int(positions[i])
        k_cache[slot, :, p] = kr[i]
        v_cache[slot, :, p] = v[i].reshape(kv_heads, dim)
    for i in range(n):
        slot, p = int(slots[i]), int(positions[i])
        first = max(0, p + 1 - window) if window > 0 else 0
        keys = k_cache[slot, :, first : p + 1].float()  # [Hkv, keys, D]
        values = v_cache[slot, :, first : p + 1].float()
        qi = qr[i].float().unsqueeze(1)  # [H, D] -> [H, 1, D]
        o = F.scaled_dot_product_attention(qi, keys, values, scale=scale, enable_gqa=True)
        out.append(o.reshape(1, -1).to(q.dtype))  # [H, 1, D] -> [1, H*D]
    return torch.cat(out)
