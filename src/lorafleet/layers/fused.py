"""One base GEMM for linears that read the same input (q/k/v; gate/up), adapters added per part.

    ys = FusedProjections([q_proj, k_proj, v_proj])(x)    # x [T, d_in] -> [q [T, dq], k, v]

Semantics: ys[i] == modules[i](x) for every i, with the base products of all parts computed as
one x @ cat(W_i)^T (+ cat(b_i)) and each part's adapter term (a MultiLoRALinear's slots, DoRA
ratios, Bat deltas, mixtures) added to its column block afterwards, exactly as its own forward
would. One larger GEMM instead of 3 (attention) or 2 (MLP) per layer: fewer kernel calls and
Python per decode step, and a wider output for the BLAS to block over. Quantised bases of one
mode share one kernel call the same way (`QuantLinear.concat`: their values stacked, not
re-quantised).

The parts' weights are re-pointed at views of the fused weight, so nothing is held twice and
the modules stay usable on their own. Parts that cannot share a GEMM (plain and quantised mixed,
other dtypes or devices, bias on some parts only, a single part) fall back to calling each module:
`fused` says which path an instance took. The outputs are column blocks of one [T, sum d_i]
tensor (views, not contiguous), which `.view` into heads keeps as views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorafleet import kernels
from lorafleet.layers.linear import MultiLoRALinear
from lorafleet.layers.quant import QuantLinear, can_concat


def base_linear(module: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear computing `module`'s base product (`module` itself, or a
    MultiLoRALinear's base layer), or None (quantised, other)."""
    base = module.base_layer if isinstance(module, MultiLoRALinear) else module
    return base if type(base) is nn.Linear else None


def base_layer(module: nn.Module) -> nn.Module | None:
    """The layer computing `module`'s base product when it is a plain nn.Linear or a
    QuantLinear (`module` itself, or a MultiLoRALinear's base layer), else None."""
    base = module.base_layer if isinstance(module, MultiLoRALinear) else module
    return base if type(base) in (nn.Linear, QuantLinear) else None


def can_fuse(modules: Sequence[nn.Module]) -> bool:
    """Whether `modules` can share one base GEMM (see the module docstring)."""
    if can_concat([base_layer(m) for m in modules]):
        return True  # quantised bases of one mode: one QuantLinear over their rows
    bases = [base_linear(m) for m in modules]
    if len(bases) < 2 or any(b is None for b in bases):
        return False
    w0 = bases[0].weight
    same = all(b.weight.dtype == w0.dtype and b.weight.device == w0.device for b in bases)
    same_in = all(b.in_features == bases[0].in_features for b in bases)
    has_bias = {b.bias is not None for b in bases}
    return same and same_in and len(has_bias) == 1


class FusedProjections:
    """Callable over x [..., d_in] -> [parts' outputs], each [..., d_out_i] (see module doc)."""

    def __init__(self, modules: Sequence[nn.Module], fuse: bool = True):
        """fuse=False (or parts that cannot share a GEMM): call each module, touch nothing."""
        self.modules = list(modules)
        self.fused = fuse and can_fuse(self.modules)
        self.quantised: QuantLinear | None = None
        if not self.fused:
            return
        bases = [base_layer(m) for m in self.modules]
        self.sizes = [b.out_features for b in bases]
        if type(bases[0]) is QuantLinear:
            self.quantised = QuantLinear.concat(bases)  # the parts' buffers become its views
            return
        with torch.no_grad():
            weight = torch.cat([b.weight for b in bases])  # [sum d_out, d_in]
            bias = None
            if bases[0].bias is not None:
                bias = torch.cat([b.bias for b in bases])  # [sum d_out]
        self.weight, self.bias = weight, bias
        start = 0
        for b, size in zip(bases, self.sizes, strict=True):  # views: nothing held twice
            b.weight = nn.Parameter(weight[start : start + size], requires_grad=False)
            if bias is not None:
                b.bias = nn.Parameter(bias[start : start + size], requires_grad=False)
            start += size

    def base(self, x: Tensor) -> Tensor:
        """The parts' base products side by side: [..., d_in] -> [..., sum d_out]."""
        if self.quantised is not None:
            return self.quantised(x)
        return kernels.linear(x, self.weight, self.bias)

    def gemv(self, x: Tensor) -> bool:
        """Whether the fused float product of x runs lorafleet's GEMV (kernels.covers)."""
        return self.fused and self.quantised is None and kernels.covers(x, self.weight)

    def __call__(self, x: Tensor) -> list[Tensor]:
        if not self.fused:
            return [m(x) for m in self.modules]
        y = self.base(x)  # [..., sum d_out]
        parts = list(y.split(self.sizes, dim=-1))  # column blocks [..., d_out_i], views
        for i, module in enumerate(self.modules):
            if isinstance(module, MultiLoRALinear):
                parts[i] = module.add_adapters(x, parts[i])
        return parts
