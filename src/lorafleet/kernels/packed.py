"""oneDNN-packed copies of dense base weights, for the products above the decode GEMV's rows.

    kernels.pack(weight)                 # once, for a weight the engine multiplies often
    y = kernels.linear(x, weight, bias)  # x [..., K] with more than GEMV_ROWS rows: the copy

Why: torch's float32 F.linear on the CPU is MKL's sgemm, which on the AMD EPYC these machines
run (AVX-512) took 2.6x the time of oneDNN's matmul over a weight reordered once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`): SmolLM2's block linears and head at
32 rows, 73.8 vs 28.8 ms; bfloat16 (already oneDNN, over the plain weight) 20.4 vs 16.1 ms
(BENCHMARKS.md, "Packed weights"). The copy costs the weight's bytes again.

Semantics: packed_linear(x, weight, bias) == F.linear(x, weight, bias) up to float rounding
(float32 accumulation in both dtypes). Rows are padded up to a bucket (a multiple of
ROW_BUCKET above GEMV_ROWS) and products of more than CHUNK_ROWS rows run in chunks of
CHUNK_ROWS, so oneDNN sees at most GEMV_ROWS + CHUNK_ROWS / ROW_BUCKET row counts per weight
shape: it keeps a primitive (and its buffers) per shape it has seen, which grew the process by
~1.5 MB per new row count when every count was new (2 GB over 1..2,048 rows).

A copy is used only while its weight is the same tensor, unmodified (its version counter) and
no gradient is wanted; anything else runs F.linear.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

GEMV_ROWS = 4  # at or below: lorafleet's GEMV (kernels.linear) or F.linear, never the copy
ROW_BUCKET = 16  # rows above GEMV_ROWS are padded up to a multiple of this
CHUNK_ROWS = 256  # longer products run in chunks of this many rows (the last one padded)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class Packed:
    """One weight's packed copy and what it was made from."""

    source: weakref.ref  # the weight [N, K]
    version: int  # the weight's version counter when packed
    copy: Tensor  # oneDNN's blocked layout (an opaque mkldnn tensor)
    out_features: int
    nbytes: int


_lock = threading.Lock()
_packed: dict[int, Packed] = {}  # id(weight) -> its copy


def supported() -> bool:
    """Whether this torch has oneDNN on the CPU (the packed path; a build without its linear
    operators makes `pack` return False)."""
    return torch.backends.mkldnn.is_available()


def pack(weight: Tensor) -> bool:
    """Make and register a packed copy of a dense CPU float32 / bfloat16 weight [N, K];
    False (nothing made) for anything else or a torch without oneDNN."""
    if not (
        supported()
        and weight.dtype in DTYPES
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.is_contiguous()
    ):
        return False
    try:
        with torch.no_grad():
            copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
    except (AttributeError, RuntimeError):  # a torch without oneDNN's linear operators
        return False
    entry = Packed(
        weakref.ref(weight),
        weight._version,
        copy,
        weight.shape[0],
        weight.numel() * weight.element_size(),
    )
    with _lock:
        _packed[id(weight)] = entry
    weakref.finalize(weight, _forget, id(weight), entry)
    return True


def _forget(key: int, entry: Packed) -> None:
    with _lock:
        if _packed.get(key) is entry:
            del _packed[key]


def unpack_all() -> None:
    """Drop every packed copy (tests; a copy otherwise goes with its weight)."""
    with _lock:
        _packed.clear()


def copy_for(x: Tensor, weight: Tensor) -> Packed | None:
    """The packed copy to compute x @ weight^T with, or None (see the module docstring)."""
    entry = _packed.get(id(weight))
    if entry is None or x.dtype is not weight.dtype or x.numel() <= GEMV_ROWS * x.shape[-1]:
        return None
    if entry.source() is not weight or weight._version != entry.version or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    return entry


def packed_linear(x: Tensor, entry: Packed, bias: Tensor | None) -> Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] through the packed copy `entry`."""
    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    rows = x2.shape[0]
    if rows <= CHUNK_ROWS:
        y = _bucketed(x2, entry.copy, bias)  # [M, N]
    else:
        y = x2.new_empty(rows, entry.out_features)  # [M, N]
        for start in range(0, rows, CHUNK_ROWS):
            end = min(rows, start + CHUNK_ROWS)
            y[start:end] = _bucketed(x2[start:end], entry.copy, bias)
    return y.view(*x.shape[:-1], entry.out_features)  # [M, N] -> [..., N]


def _bucketed(x: Tensor, copy: Tensor, bias: Tensor | None) -> Tensor:
    """x [m, K] (m <= CHUNK_ROWS) padded with zero rows to its bucket, multiplied, cut back."""
    rows = x.shape[0]
    padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
    if padded != rows:
        x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))  # [padded, K]
    y = onednn_linear(x.contiguous(), copy, bias)  # [padded, N]
    return y[:rows]  # [padded, N] -> [m, N]: a contiguous view


def onednn_linear(x: Tensor, copy: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's matmul of x [m, K] with a packed copy of W [N, K] (+ bias) -> [m, N]."""
    return torch.ops.mkldnn._linear_pointwise(x, copy, bias, "none", [], "")


def linear_or_none(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """packed_linear when `weight` has a usable copy for x, else None."""
    entry = copy_for(x, weight) if _packed else None
    return None if entry is None else packed_linear(x, entry, bias)
