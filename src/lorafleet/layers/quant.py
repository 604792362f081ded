"""Weight-only int8 / int4 base linears on torch's CPU kernels: semantics, layouts, paths.

Semantics. A linear W: [N, K] (out_features x in_features, + optional bias b) is stored
quantised and served as y = x @ W_hat^T + b, where W_hat is the dequantised weight:

- int8, per output channel, symmetric: s[n] = max_k |W[n, k]| / 127 rounded to bfloat16;
  q[n, k] = clamp(round(W[n, k] / s[n]), -127, 127) (int8); W_hat[n, k] = q[n, k] * s[n].
  Stored: q [N, K] int8, s [N] bfloat16 (1 + 2/K bytes per weight).
- int4, groups of GROUP_SIZE = 32 along K, asymmetric: per group g of row n, with lo / hi the
  group's min / max, scale = (hi - lo) / 15 and zero = lo + 8 * scale, both rounded to
  bfloat16; q = clamp(round((W - zero) / scale) + 8, 0, 15); W_hat = (q - 8) * scale + zero.
  Stored: q packed by `_convert_weight_to_int4pack_for_cpu` into [N, K/2] uint8 (its layout
  depends on the CPU's vector width: never read directly, see `_int4_order`), and
  scales_and_zeros [K/32, N, 2] bfloat16 (0.625 bytes per weight).

Kernel requirements (checked before anything is changed): K % 32 == 0 for both (torch's int8
kernel crashes on some other K), and N % 16 == 0 for int4. `quantize_linears` leaves a linear
that does not fit in its dense dtype and reports it.

Two paths, chosen per call by the number of rows M = x.numel() / K:
- packed (M <= PACKED_MAX_ROWS, decode): torch's weight-only kernels
  `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` on x cast to bfloat16 (fed
  float32 they were 7-30x slower here), the output cast back to x's dtype. They read the
  int8 / int4 bytes directly: the decode step moves 1 or 0.625 bytes per weight.
- dequantised (M > PACKED_MAX_ROWS, prefill): W_hat is built for this call and the product
  runs as one GEMM (faster than the packed kernels at these sizes): in float32 for float32 x;
  for bfloat16 x, W_hat in bfloat16 and a bfloat16 GEMM (measured 3.6x a float32 GEMM at 24 to
  512 rows over SmolLM2's weights, 2 threads, on a quiet machine: BENCHMARKS.md). Nothing is
  cached: memory stays at the quantised bytes.
Both compute x @ W_hat^T with float32 accumulation; the packed path rounds x and y to
bfloat16 (as the bfloat16 GEMM does W_hat), so the two agree to bfloat16 precision, not bit
for bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet.errors import LorafleetError
from lorafleet.linear_layers import block_linear_modules

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32
# Rows at or below which the packed kernels run. Measured on the project's 2-core CPU (1
# thread, load average ~8, so rough) over SmolLM2's four linear shapes: packed int8 2.4 ms vs
# dequantise + float32 GEMM 2.8 ms at 16 rows, 15.2 vs 8.1 ms at 128 rows (a bfloat16 GEMM:
# 10.1 and 63 ms; float32 dense 2.0 and 8.4 ms). Re-measured quiet over all of SmolLM2's weights
# (2 threads, weights streamed from memory, not cached): bfloat16 GEMMs are 2.8-4x float32 at
# every M from 1 to 512, so the dequantised path runs in bfloat16 when x is (module doc).
PACKED_MAX_ROWS = 32
KERNEL_DTYPE = torch.bfloat16


def fits(mode: str, out_features: int, in_features: int) -> bool:
    """Whether torch's kernel for `mode` takes a [out_features, in_features] weight."""
    if in_features % GROUP_SIZE:
        return False
    return mode == "int8" or out_features % 16 == 0


class QuantLinear(nn.Module):
    """A weight-only quantised stand-in for nn.Linear (int8 or int4; see the module doc).

    `weight` is W_hat dequantised in the original dtype, built on each access (for adapter
    checks such as DoRA's norms, not for the forward)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        W = linear.weight.detach()
        self.out_features, self.in_features = W.shape
        if mode not in ("int8", "int4") or not fits(mode, *W.shape):
            raise LorafleetError(f"{mode} cannot take a {tuple(W.shape)} weight")
        self.mode, self.dtype = mode, W.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        Wf = W.float()
        if mode == "int8":
            s = (Wf.abs().amax(dim=1) / 127).clamp(min=1e-12).to(KERNEL_DTYPE)  # [N]
            q = torch.round(Wf / s.float()[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
            self.register_buffer("qweight", q)
            self.register_buffer("scales", s)
        else:
            g = Wf.view(W.shape[0], -1, GROUP_SIZE)  # [N, K/32, 32]
            lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, K/32]
            scale = ((hi - lo) / 15).clamp(min=1e-12).to(KERNEL_DTYPE)
            zero = (lo + 8 * scale.float()).to(KERNEL_DTYPE)
            q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]) + 8
            q = q.clamp(0, 15).to(torch.int32).view(W.shape)  # [N, K], values 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2] uint8
            sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()  # [K/32, N, 2]
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", sz)

    def int_values(self) -> Tensor:
        """q as stored, unpacked: [N, K] (int8 values, or int4 values 0..15 as uint8)."""
        if self.mode == "int8":
            return self.qweight
        p = self.qweight.reshape(-1)
        nibbles = torch.stack((p & 15, p >> 4), dim=-1).reshape(-1)  # kernel order
        order = _int4_order(self.out_features, self.in_features)
        return nibbles.index_select(0, order).view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat: [N, K] in `dtype` (computed in float32)."""
        q = self.int_values().float()
        if self.mode == "int8":
            w = q * self.scales.float()[:, None]
        else:
            sz = self.scales_and_zeros.float().transpose(0, 1)  # [N, K/32, 2]
            g = q.view(self.out_features, -1, GROUP_SIZE)  # [N, K/32, 32]
            w = ((g - 8) * sz[..., :1] + sz[..., 1:]).view(self.out_features, self.in_features)
        return w.to(dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x2.shape[0] <= PACKED_MAX_ROWS:
            xk = x2.to(KERNEL_DTYPE)
            if self.mode == "int8":
                y = torch.ops.aten._weight_int8pack_mm(xk, self.qweight, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xk, self.qweight, GROUP_SIZE, self.scales_and_zeros
                )
            y = y.to(x.dtype)  # [M, N]
        elif x2.dtype == torch.bfloat16:  # a bfloat16 GEMM: 3.6x a float32 one here, any M
            y = F.linear(x2, self.dequantize(torch.bfloat16))  # [M, N]
        else:
            y = F.linear(x2.float(), self.dequantize()).to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.mode}, dtype={self.dtype}"


@functools.lru_cache(maxsize=32)
def _int4_order(n: int, k: int) -> Tensor:
    """[n*k] long: for each position of W [n, k] (flat), the index of its nibble in the
    kernel's packed bytes (byte i's low nibble is 2i, its high 2i + 1). Found by packing the
    flat positions themselves, 4 bits per probe, so it is right for whatever layout this
    CPU's kernel uses."""
    pos = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)  # packed nibble -> position in W
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        probe = ((pos >> shift) & 15).to(torch.int32).view(n, k)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        nibbles = torch.stack((p & 15, p >> 4), dim=-1).reshape(-1).to(torch.int64)
        source |= nibbles << shift
    order = torch.empty_like(source)
    order[source] = torch.arange(n * k)
    if not torch.equal(source.sort().values, pos):
        raise LorafleetError("torch's int4 packing is not a permutation here; use int8")
    return order


def check_mode(mode: str | None) -> str:
    """The mode as one of MODES (None = "none"), or a one-line LorafleetError."""
    mode = "none" if mode is None else str(mode).lower()
    if mode not in MODES:
        raise LorafleetError(f"unknown quantisation {mode!r}: use one of {', '.join(MODES)}")
    return mode


def check_device(mode: str | None, device: torch.device | str) -> None:
    """A one-line LorafleetError when `mode` quantises (int8 / int4) and `device` is not the
    CPU: the kernels above are torch's CPU ones."""
    mode, device = check_mode(mode), torch.device(device)
    if mode != "none" and device.type != "cpu":
        raise LorafleetError(
            f"--quantize {mode} runs on torch's CPU kernels only, not on {device.type}: "
            "use --device cpu, or --quantize none (--dtype bfloat16 halves the weights)"
        )


@torch.no_grad()
def quantize_linears(model: nn.Module, mode: str | None) -> dict:
    """Replace the block linears of `model` (q/k/v/o, gate/up/down; also those wrapped as a
    MultiLoRALinear's `base_layer`) by QuantLinear in place. Embeddings, norms and the output
    head keep their dtype. Returns {"mode", "quantized": n, "kept_dense": [names that the
    kernel cannot take]}."""
    mode = check_mode(mode)
    report = {"mode": mode, "quantized": 0, "kept_dense": []}
    if mode == "none":
        return report
    for name, linear in block_linear_modules(model).items():
        if not fits(mode, linear.out_features, linear.in_features):
            report["kept_dense"].append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(linear, mode))
        report["quantized"] += 1
    if not report["quantized"]:
        raise LorafleetError(f"no linear of this model fits the {mode} kernel (K % {GROUP_SIZE})")
    return report


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and quantised weights (adapter slots, KV not counted)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total
