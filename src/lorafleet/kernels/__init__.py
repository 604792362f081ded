"""lorafleet's own CPU kernels (decode GEMV, decode-layer ops), built once per machine, with torch
as the fallback.

    y = kernels.linear(x, weight, bias)  # x [..., K] -> [..., N], == F.linear up to rounding

It runs gemv.cpp (its header states the exact semantics) when the call is a decode-sized
product it covers: x and weight on the CPU in the same dtype, float32 with at most
MAX_ROWS["float32"] rows or bfloat16 with at most MAX_ROWS["bfloat16"], K a multiple of 16, a
contiguous weight, no gradient wanted. Anything else, or a machine where the extension cannot
be built (no C++ compiler) or `$LORAFLEET_KERNELS=0`, runs torch's own op instead: the same
product, summed in another order.

A weight registered with `pack` (packed.py: a oneDNN-packed copy) runs through that copy for
products of more than packed.GEMV_ROWS rows, ahead of the GEMV and of F.linear.

The decode-layer ops (`rms_norm`, `add_rms_norm`, `silu_mul`, `decode_attention`: decode.cpp)
do the small work between a decode layer's products in 4 calls instead of ~40 torch ops; the
runners use them when `decode_ready` (reference.py states the same semantics in torch ops).

The extension is compiled on first use (~25 s) into ~/.cache/lorafleet-kernels (build.py);
`make install` builds it ahead (`python -m lorafleet.kernels`).
"""

from __future__ import annotations

import threading
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafleet.kernels import build, packed, reference

# Rows at or below which the GEMV runs, per dtype. Measured over SmolLM2's block linears and
# head (`python bench/decode_gemv.py`, 2 threads, AVX-512 EPYC, median of 5 interleaved; the
# figures and the runs' spread in BENCHMARKS.md "Decode GEMV"): float32 2.0-3.3x torch's at 1-6
# rows, 2.2x at 8, 1.3x at 16, 1.1x at 24, 0.8x at 32 (MKL's blocked GEMM, compute-bound there);
# bfloat16 1.7x at 1-2 rows, 1.4x at 4, even at 6, 0.8x at 8 (oneDNN's AVX512-BF16 GEMM).
# Torch's int8 / int4 kernels beat a plain loop over those weights here (0.7x at one row for
# int8), so quantised weights keep them.
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
LANES = 16  # gemv.cpp's K step

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the extension, or "error": why it is not there


def extension() -> ModuleType | None:
    """The compiled kernels, or None (disabled, or the build failed: `unavailable_reason`)."""
    module = _state.get("module")
    if module is not None or "error" in _state:
        return module  # type: ignore[return-value]
    with _lock:
        if "module" not in _state and "error" not in _state:
            if not build.enabled():
                _state["error"] = f"disabled by ${build.ENV_SWITCH}"
            else:
                try:
                    _state["module"] = build.load()
                except Exception as exc:  # no compiler, no ninja, a failed build: torch's ops
                    reason = str(exc).strip().splitlines()
                    _state["error"] = reason[-1] if reason else type(exc).__name__
                    build.log.warning(
                        "lorafleet's CPU kernels are unavailable (%s); using torch's",
                        _state["error"],
                    )
    return _state.get("module")  # type: ignore[return-value]


def available() -> bool:
    """Whether the kernels are built and enabled (builds them on first call)."""
    return extension() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not in use, or None when they are."""
    return None if available() else str(_state.get("error"))


def reset() -> None:
    """Forget the loaded state, so the next call re-reads `$LORAFLEET_KERNELS` (tests)."""
    with _lock:
        _state.clear()


def pack(weight: Tensor) -> bool:
    """Keep a oneDNN-packed copy of `weight` [N, K] for `linear` (packed.py); False where none
    is made (not a dense CPU float32 / bfloat16 weight, no oneDNN, `$LORAFLEET_KERNELS=0`)."""
    return build.enabled() and packed.pack(weight)


def covers(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight^T is a product the GEMV takes (see the module docstring). Called on
    every base product of a decode step: the cheap, usually deciding checks come first."""
    max_rows = MAX_ROWS.get(weight.dtype)
    if max_rows is None or x.dtype is not weight.dtype:
        return False
    k = weight.shape[-1]
    return (
        0 < x.numel() <= max_rows * k
        and x.shape[-1] == k
        and k % LANES == 0
        and x.is_cpu
        and weight.is_cpu
        and weight.dim() == 2
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for x [..., K], weight [N, K] (see the module docstring)."""
    y = packed.linear_or_none(x, weight, bias)  # a packed copy, above the GEMV's rows
    if y is not None:
        return y
    if covers(x, weight):
        ext = extension()
        if ext is not None:
            if x.dim() == 2:  # the engine's rows: no reshape (each op costs ~2 us a call)
                return ext.linear_dense(x.contiguous(), weight, bias_for(bias, weight))
            x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [..., K] -> [M, K]
            y = ext.linear_dense(x2, weight, bias_for(bias, weight))  # [M, N]
            return y.view(*x.shape[:-1], weight.shape[0])  # [M, N] -> [..., N]
    return F.linear(x, weight, bias)


# Rows at or below which int8 weights (layers/quant.py) run gemv.cpp's linear_int8: one row
# 1.26x torch's _weight_int8pack_mm over SmolLM2's block linears (3.54 vs 4.45 ms, AVX-512,
# median of 7), slower from two rows (5.5 vs 4.4 ms).
INT8_MAX_ROWS = 1


def linear_int8(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor | None:
    """x [M, K] @ (q * scales[:, None])^T (+ bias) for an int8 q [N, K] with per-row scales [N]
    by the GEMV when it covers the call (M <= INT8_MAX_ROWS, x float32 / bfloat16 on the CPU,
    K % 16 == 0, no gradient), else None. x is used as given (torch's int8 kernel rounds a
    float32 x to bfloat16 first)."""
    if not (
        x.dim() == 2
        and 0 < x.shape[0] <= INT8_MAX_ROWS
        and x.dtype in MAX_ROWS
        and x.shape[1] % LANES == 0
        and x.is_cpu
        and not torch.is_grad_enabled()
    ):
        return None
    ext = extension()
    if ext is None:
        return None
    if bias is not None and (bias.dtype not in MAX_ROWS or not bias.is_contiguous()):
        bias = bias.float().contiguous()  # the kernel reads a float32 or bfloat16 bias
    return ext.linear_int8(x.contiguous(), q, scales, bias)


def bias_for(bias: Tensor | None, weight: Tensor) -> Tensor | None:
    """bias as the kernel reads it: contiguous, in the weight's dtype."""
    if bias is None or (bias.dtype == weight.dtype and bias.is_contiguous()):
        return bias
    return bias.to(weight.dtype).contiguous()


# The decode-layer kernels (decode.cpp: its header states their exact semantics; reference.py
# gives them in torch ops, which run instead where the extension is not built).


def decode_ready(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the compiled decode-layer kernels take a model of `dtype` and `head_dim`."""
    return dtype in MAX_ROWS and head_dim % LANES == 0 and available()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm of x [M, d] (contiguous) with weight [d] in x's dtype -> [M, d]."""
    ext = extension()
    return reference.rms_norm(x, weight, eps) if ext is None else ext.rms_norm(x, weight, eps)


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(h + delta, rms_norm(h + delta)): a residual add and the next norm, [M, d] each."""
    ext = extension()
    if ext is None:
        return reference.add_rms_norm(h, delta, weight, eps)
    return ext.add_rms_norm(h, delta, weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up [M, 2I] (contiguous; gate = the first I columns) -> [M, I]."""
    ext = extension()
    return reference.silu_mul(gate_up) if ext is None else ext.silu_mul(gate_up)


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
    window: int | None = None,
) -> Tensor:
    """One decode row per sequence: RoPE on q [n, H*D] and k [n, Hkv*D], k and v [n, Hkv*D]
    written to k_cache, v_cache [S, Hkv, L, D] at (slots[i], positions[i]), then each row's
    attention over its keys 0..positions[i] (the last `window` only, on sliding layers) ->
    o [n, H*D]. cos, sin: [n, D]."""
    ext = extension()
    args = (q, k, v, cos, sin, k_cache, v_cache, slots, positions, scale, window or 0)
    return reference.decode_attention(*args) if ext is None else ext.decode_attention(*args)


def decode_stack(
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    slots: Tensor,
    positions: Tensor,
    weights: list[Tensor],
    k_all: Tensor,
    v_all: Tensor,
    eps: list[float],
    scales: list[float],
    windows: list[int],
) -> Tensor:
    """Every layer of a Llama-layout decoder for decode rows h [n, d] in one call (stack.cpp
    states the arguments: 8 weights per layer, the whole KV cache [layers, S, Hkv, L, D]) ->
    the final norm of the last hidden states [n, d]. Needs the extension (`decode_ready`)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"lorafleet's kernels are unavailable: {unavailable_reason()}")
    return ext.decode_stack(
        h, cos, sin, slots, positions, weights, k_all, v_all, eps, scales, windows
    )
