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

Two paths, chosen per call by the number of rows M = x.numel() / K and `packed_max_rows` (32
rows on AVX2 CPUs; on AVX-512 ones, where torch's packed kernels are faster, up to 512):
- packed (M <= packed_max_rows, decode and short prefills): torch's weight-only kernels
  `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` on x cast to bfloat16 (fed
  float32 they were 7-30x slower here), the output cast back to x's dtype. They read the
  int8 / int4 bytes directly: the decode step moves 1 or 0.625 bytes per weight.
- dequantised (M > packed_max_rows, prefill): W_hat is built for this call and the product
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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet import kernels
from lorafleet.errors import LorafleetError
from lorafleet.linear_layers import block_linear_modules

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32
# Rows at or below which the packed kernels run (`packed_max_rows`). On AVX2 CPUs, measured on
# the project's earlier 2-core host (1 thread, load average ~8, so rough) over SmolLM2's four
# linear shapes: packed int8 2.4 ms vs dequantise + float32 GEMM 2.8 ms at 16 rows, 15.2 vs
# 8.1 ms at 128 rows (a bfloat16 GEMM: 10.1 and 63 ms; float32 dense 2.0 and 8.4 ms); quiet,
# over all of SmolLM2's weights, bfloat16 GEMMs were 2.8-4x float32 at every M from 1 to 512.
PACKED_MAX_ROWS = 32
# Where torch runs its AVX-512 kernels (with AVX512-BF16 dot products), measured over all of
# SmolLM2's block linears (2 threads, AVX-512 EPYC, BENCHMARKS.md "Decode GEMV"): int4 packed
# 24 / 67 / 170 / 341 ms at 32 / 100 / 256 / 512 rows vs dequantised 235 / 307 / 507 / 750 in
# float32 and 207 / 222 / 274 / 346 in bfloat16; int8 packed 27 / 101 / 365 ms at 32 / 128 /
# 512 rows vs 109 / 227 / 596 float32 and 51 / 95 / 193 bfloat16.
PACKED_MAX_ROWS_AVX512 = {
    ("int4", torch.float32): 512,
    ("int4", torch.bfloat16): 512,
    ("int8", torch.float32): 512,
    ("int8", torch.bfloat16): 64,
}
KERNEL_DTYPE = torch.bfloat16


@functools.cache
def avx512() -> bool:
    """Whether torch runs its AVX-512 CPU kernels here."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def packed_max_rows(mode: str, dtype: torch.dtype) -> int:
    """Rows at or below which `mode`'s packed kernel runs for x in `dtype` on this CPU."""
    if avx512():
        return PACKED_MAX_ROWS_AVX512.get((mode, dtype), PACKED_MAX_ROWS)
    return PACKED_MAX_ROWS


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

    @classmethod
    def concat(cls, parts: Sequence[QuantLinear]) -> QuantLinear:
        """One QuantLinear computing the parts' outputs side by side ([..., sum N_i]) from the
        same quantised values, scales and biases stacked along N: nothing is quantised again,
        so each output column equals its part's. The parts' int8 weights and scales become
        views of the new one's (int4 weights too where the kernel's packing keeps rows apart):
        they stay usable on their own and their bytes are held once."""
        if not can_concat(parts):
            raise LorafleetError("these quantised linears cannot share one kernel call")
        first = parts[0]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.out_features = sum(p.out_features for p in parts)
        fused.in_features, fused.mode, fused.dtype = first.in_features, first.mode, first.dtype
        fused.bias = None
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), False)  # [sum N]
        if first.mode == "int8":
            fused.register_buffer("qweight", torch.cat([p.qweight for p in parts]))  # [sum N, K]
            fused.register_buffer("scales", torch.cat([p.scales for p in parts]))  # [sum N]
        else:
            values = torch.cat([p.int_values() for p in parts]).to(torch.int32)  # [sum N, K]
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            fused.register_buffer("qweight", packed)  # [sum N, K/2] uint8
            sz = torch.cat([p.scales_and_zeros for p in parts], dim=1)  # [K/32, sum N, 2]
            fused.register_buffer("scales_and_zeros", sz)
        fused.share_with(parts)
        return fused

    def share_with(self, parts: Sequence[QuantLinear]) -> None:
        """Re-point each part's row-block buffers at views of this (their concatenation)."""
        start = 0
        for part in parts:
            rows = slice(start, start + part.out_features)
            if torch.equal(self.qweight[rows], part.qweight):  # int4: if packing keeps rows apart
                part.qweight = self.qweight[rows]
            if self.mode == "int8":
                part.scales = self.scales[rows]
            if part.bias is not None:
                part.bias = nn.Parameter(self.bias[rows], False)
            start += part.out_features

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
        if self.mode == "int8":  # a decode row: lorafleet's int8 GEMV (kernels.linear_int8)
            y = kernels.linear_int8(x2, self.qweight, self.scales, self.bias)
            if y is not None:
                return y.view(*lead, self.out_features)
        if x2.shape[0] <= packed_max_rows(self.mode, x2.dtype):
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


def can_concat(parts: Sequence[nn.Module]) -> bool:
    """Whether `parts` are QuantLinears that `QuantLinear.concat` can stack: at least two, one
    mode, dtype and in_features, and a bias on all or none."""
    if len(parts) < 2 or any(type(p) is not QuantLinear for p in parts):
        return False
    first = parts[0]
    return all(
        p.mode == first.mode
        and p.dtype == first.dtype
        and p.in_features == first.in_features
        and (p.bias is None) == (first.bias is None)
        for p in parts
    )


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
