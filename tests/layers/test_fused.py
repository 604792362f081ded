"""Fused q/k/v and gate/up base GEMMs: equal to calling each projection, adapters included."""

from __future__ import annotations

import torch
from torch import nn

from lorafleet.layers import (
    FusedProjections,
    MultiLoRAContext,
    MultiLoRALinear,
    QuantLinear,
    RowMixture,
    can_fuse,
)


def _linear(d_in: int, d_out: int, seed: int, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)


def _projections(bias: bool = False):
    """Three MultiLoRALinear over one context with LoRA slots of mixed ranks, a DoRA ratio and
    a Bat delta in slots 3 and 4 of the first, and an un-adapted third one."""
    context = MultiLoRAContext()
    layers = [
        MultiLoRALinear(_linear(16, d, i, bias), context, 4, 4, f"p{i}")
        for i, d in enumerate((16, 8, 8))
    ]
    gen = torch.Generator().manual_seed(0)
    for layer in layers[:2]:
        d_out, d_in = layer.base_layer.weight.shape
        for slot, r in ((1, 2), (2, 4), (3, 3)):
            A, B = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
            layer.set_slot(slot, A, B, 0.5)
    layers[0].ratios[3] = torch.rand(16, generator=gen) + 0.5  # DoRA-style per-column ratio
    layers[0].dense[4] = torch.randn(16, 16, generator=gen) * 0.1  # Bat-style dense delta
    return context, layers


def test_fused_outputs_equal_each_projection_with_adapters_dora_bat_and_mixtures():
    for bias in (False, True):
        context, layers = _projections(bias)
        x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
        slots = torch.tensor([0, 1, 2, 3, 4, 1, 2, 0, 0, 3])
        mixtures = [RowMixture((7,), (1, 2), (0.7, 0.3)), RowMixture((8,), (2, 1), (0.5, -0.5))]
        context.set_slots(slots, mixtures)
        expected = [layer(x).clone() for layer in layers]
        fused = FusedProjections(layers)
        assert fused.fused
        got = fused(x)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        # The layers now read views of the fused weight: nothing held twice, still usable alone.
        start = fused.weight.data_ptr()
        end = start + fused.weight.numel() * fused.weight.element_size()
        for layer, e in zip(layers, expected, strict=True):
            assert start <= layer.base_layer.weight.data_ptr() < end
            torch.testing.assert_close(layer(x), e, rtol=1e-5, atol=1e-5)
        context.clear()
        plain = fused(x)  # no slots set: exactly the base products
        for layer, p in zip(layers, plain, strict=True):
            torch.testing.assert_close(p, layer.base_layer(x), rtol=1e-6, atol=1e-6)


def test_parts_that_cannot_share_a_gemm_fall_back_to_calling_each():
    context = MultiLoRAContext()
    layers = [MultiLoRALinear(_linear(32, 16, i), context, 2, 2) for i in range(2)]
    layers[1].base_layer = QuantLinear(layers[1].base_layer, "int8")  # a quantised base
    assert not can_fuse(layers)
    fused = FusedProjections(layers)
    x = torch.randn(3, 32)
    assert not fused.fused
    for g, layer in zip(fused(x), layers, strict=True):
        torch.testing.assert_close(g, layer(x))
    mixed_bias = [_linear(16, 8, 0, bias=True), _linear(16, 8, 1, bias=False)]
    assert not can_fuse(mixed_bias) and not can_fuse(mixed_bias[:1])


def test_quantised_parts_of_one_mode_share_one_kernel_call_with_adapters():
    for mode in ("int8", "int4"):
        context = MultiLoRAContext()
        parts = [
            MultiLoRALinear(_linear(32, d, i, bias=True), context, 4, 4, f"q{i}")
            for i, d in enumerate((32, 16, 16))
        ]
        for part in parts:
            part.base_layer = QuantLinear(part.base_layer, mode)
        gen = torch.Generator().manual_seed(2)
        parts[0].set_slot(
            1, torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen), 0.5
        )
        x = torch.randn(5, 32, generator=gen)
        context.set_slots(torch.tensor([0, 1, 1, 0, 1]))
        expected = [part(x).clone() for part in parts]
        assert can_fuse(parts)
        fused = FusedProjections(parts)
        assert fused.fused and fused.quantised is not None
        for g, e in zip(fused(x), expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        for part, e in zip(parts, expected, strict=True):  # still usable alone
            torch.testing.assert_close(part(x), e, rtol=1e-5, atol=1e-5)
    mixed = [QuantLinear(_linear(32, 16, 0), "int8"), QuantLinear(_linear(32, 16, 1), "int4")]
    assert not can_fuse(mixed)
