"""Weight-only int8 / int4 linears: each path equals a dequantise-then-matmul reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.errors import LorafleetError
from lorafleet.layers import quant
from lorafleet.layers.quant import QuantLinear, quantize_linears, weight_bytes
from lorafleet.models.tiny import tiny_llama


def _linear(n: int, k: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    return layer


def _reference_int8(W: torch.Tensor) -> torch.Tensor:
    """The docstring's int8 rule, written out directly."""
    s = (W.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    return torch.round(W / s[:, None]).clamp(-127, 127) * s[:, None]


def _reference_int4(W: torch.Tensor) -> torch.Tensor:
    """The docstring's int4 rule (groups of 32 along K), written out directly."""
    n, k = W.shape
    out = torch.empty_like(W)
    for row in range(n):
        for g0 in range(0, k, 32):
            w = W[row, g0 : g0 + 32]
            scale = ((w.max() - w.min()) / 15).to(torch.bfloat16).float()
            zero = (w.min() + 8 * scale).to(torch.bfloat16).float()
            q = (torch.round((w - zero) / scale) + 8).clamp(0, 15)
            out[row, g0 : g0 + 32] = (q - 8) * scale + zero
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantised_weight_follows_the_documented_rule(mode):
    lin = _linear(48, 96)
    ref = (_reference_int8 if mode == "int8" else _reference_int4)(lin.weight.detach())
    q = QuantLinear(lin, mode)
    torch.testing.assert_close(q.dequantize(), ref, rtol=0, atol=1e-6)
    # and it is a real quantisation: close to W, not equal
    err = (q.dequantize() - lin.weight).abs().max().item()
    assert 0 < err < (0.002 if mode == "int8" else 0.02)


def test_int4_unpacking_inverts_the_kernel_packing():
    lin = _linear(64, 128, seed=3)
    q = QuantLinear(lin, "int4")
    vals = q.int_values()
    repacked = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals.to(torch.int32), 1)
    assert torch.equal(repacked, q.qweight)
    assert int(vals.max()) <= 15 and vals.dtype == torch.uint8


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("more", [None, 1, 7])  # rows: 1 and 5 (packed), or past the limit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_path_equals_dequantise_then_matmul(mode, more, dtype):
    limit = quant.packed_max_rows(mode, dtype)
    rows = 5 if more == 1 else (1 if more is None else limit + more)
    lin = _linear(64, 96, bias=True, seed=1)
    q = QuantLinear(lin, mode)
    x = torch.randn(rows, 96).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (rows, 64)
    if rows <= limit or dtype == torch.bfloat16:  # a bfloat16 kernel or GEMM
        ref = x.to(torch.bfloat16).float() @ q.dequantize().T
    else:
        ref = x.float() @ q.dequantize().T
    ref = ref + lin.bias.detach().float()
    tol = 2e-2 * ref.abs().max().item()  # bfloat16 output rounding, nothing more
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=tol)
    if rows > limit and dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # one float32 GEMM


def test_leading_dims_and_weight_property():
    lin = _linear(32, 64)
    q = QuantLinear(lin, "int8")
    x = torch.randn(2, 3, 64)
    assert q(x).shape == (2, 3, 32)
    assert q.weight.shape == (32, 64) and q.weight.dtype == torch.float32


def test_the_packed_limit_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(quant, "avx512", lambda: False)
    assert quant.packed_max_rows("int4", torch.float32) == quant.PACKED_MAX_ROWS
    monkeypatch.setattr(quant, "avx512", lambda: True)
    assert quant.packed_max_rows("int4", torch.float32) == 512
    assert quant.packed_max_rows("int8", torch.bfloat16) == 64


def test_bad_shapes_are_refused_or_kept_dense():
    with pytest.raises(LorafleetError, match="cannot take"):
        QuantLinear(_linear(40, 64), "int4")  # N % 16
    with pytest.raises(LorafleetError, match="cannot take"):
        QuantLinear(_linear(64, 50), "int8")  # K % 32
    with pytest.raises(LorafleetError, match="unknown quantisation"):
        quantize_linears(nn.Sequential(), "int3")


def test_quantize_linears_on_a_tiny_model():
    model = tiny_llama(vocab_size=256)
    before = weight_bytes(model)
    report = quantize_linears(model, "int4")
    assert report["quantized"] == 14 and report["kept_dense"] == []  # 2 layers x 7 linears
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)  # the head (tied embedding) stays dense
    assert weight_bytes(model) < before
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("past_limit", [False, True])  # packed kernel, dequantised
def test_concat_stacks_the_parts_values_and_shares_their_bytes(mode, past_limit):
    rows = quant.packed_max_rows(mode, torch.float32) + 3 if past_limit else 1
    parts = [
        QuantLinear(_linear(n, 96, bias=True, seed=i), mode) for i, n in enumerate((64, 32, 32))
    ]
    x = torch.randn(rows, 96)
    before = [p(x) for p in parts]
    values = torch.cat([p.dequantize() for p in parts])
    fused = QuantLinear.concat(parts)
    assert torch.equal(fused.dequantize(), values)  # the same values: nothing re-quantised
    y = fused(x)
    assert y.shape == (rows, 128)
    torch.testing.assert_close(y, torch.cat(before, dim=-1), rtol=1e-5, atol=1e-5)
    start = 0
    for part, b in zip(parts, before, strict=True):
        assert torch.equal(part(x), b)  # each part still gives its own output
        torch.testing.assert_close(part.dequantize(), values[start : start + part.out_features])
        start += part.out_features
    if mode == "int8":  # row blocks of the fused weight: held once
        ptr = fused.qweight.data_ptr()
        assert parts[1].qweight.data_ptr() == ptr + 64 * 96


def test_concat_refuses_parts_that_differ():
    a = QuantLinear(_linear(32, 64), "int8")
    with pytest.raises(LorafleetError, match="cannot share"):
        QuantLinear.concat([a, QuantLinear(_linear(32, 64), "int4")])
    with pytest.raises(LorafleetError, match="cannot share"):
        QuantLinear.concat([a])
