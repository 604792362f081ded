"""lorafleet's decode GEMV against torch's F.linear: parity, batch invariance, the fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lorafleet import kernels
from lorafleet.kernels import build


def reference(x, w, b=None):
    """x @ w^T + b in float64, as x's dtype's callers would round it."""
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def test_the_extension_builds_here():
    # make install builds it and every CI machine has a compiler: no silent fallback in CI.
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_matches_a_float64_reference(rows, with_bias):
    torch.manual_seed(rows)
    w, x = torch.randn(96, 160), torch.randn(rows, 160)
    b = torch.randn(96) if with_bias else None
    y = kernels.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    torch.testing.assert_close(y.double(), reference(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_bfloat16_accumulates_in_float32_and_rounds_once(rows):
    torch.manual_seed(rows)
    w = torch.randn(64, 256).bfloat16()
    x = torch.randn(rows, 256).bfloat16()
    b = torch.randn(64).bfloat16()
    y = kernels.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    # one rounding of an (almost) exact float32 sum: the nearest bfloat16 or its neighbour
    ref = reference(x, w, b).bfloat16().double()
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=1e-2)


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    w, x = torch.randn(80, 192), torch.randn(11, 192)  # two passes of 4 rows, then 3
    batch = kernels.linear(x, w)
    for i in range(11):
        assert torch.equal(kernels.linear(x[i : i + 1], w)[0], batch[i])


def test_leading_dims_and_non_contiguous_inputs():
    torch.manual_seed(1)
    w = torch.randn(48, 64)
    x = torch.randn(2, 1, 128)[..., ::2]  # [2, 1, 64], strided
    y = kernels.linear(x, w)
    assert y.shape == (2, 1, 48)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_gemv_really_runs_where_it_covers(monkeypatch):
    calls = []
    ext = kernels.extension()

    class Spy:
        def linear_dense(self, *args):
            calls.append(args[0].shape)
            return ext.linear_dense(*args)

    monkeypatch.setattr(kernels, "extension", Spy)
    kernels.linear(torch.randn(1, 32), torch.randn(8, 32))
    assert calls == [(1, 32)]


@pytest.mark.parametrize(
    "x, w",
    [
        (torch.randn(17, 32), torch.randn(8, 32)),  # more float32 rows than MAX_ROWS
        (torch.randn(5, 32).bfloat16(), torch.randn(8, 32).bfloat16()),  # bfloat16 above 4
        (torch.randn(1, 40), torch.randn(8, 40)),  # K not a multiple of 16
        (torch.randn(1, 32).double(), torch.randn(8, 32).double()),  # another dtype
        (torch.randn(1, 32), torch.randn(32, 8).T),  # a transposed (non-contiguous) weight
        (torch.randn(1, 32), torch.randn(8, 32).bfloat16()),  # mixed dtypes
    ],
)
def test_products_it_does_not_cover_are_torchs_own(x, w, monkeypatch):
    def not_asked():
        raise AssertionError("the extension must not be asked for a product it does not cover")

    monkeypatch.setattr(kernels, "extension", not_asked)
    if x.dtype != w.dtype:
        with pytest.raises(RuntimeError):
            F.linear(x, w)
        return
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def test_a_wanted_gradient_goes_to_torch():
    w = torch.randn(8, 32, requires_grad=True)
    y = kernels.linear(torch.randn(1, 32), w)
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_the_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    kernels.reset()
    assert not kernels.available()
    assert build.ENV_SWITCH in kernels.unavailable_reason()
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    def no_compiler(verbose=False):
        raise RuntimeError("Ninja is required to load C++ extensions\nno c++ found")

    monkeypatch.setattr(build, "load", no_compiler)
    kernels.reset()
    with caplog.at_level(logging.WARNING, logger=build.log.name):
        x, w = torch.randn(1, 32), torch.randn(8, 32)
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
        kernels.linear(x, w)
    assert kernels.unavailable_reason() == "no c++ found"
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_the_build_key_changes_with_the_cpu(monkeypatch):
    tag = build.build_tag()
    monkeypatch.setattr(build.cpu, "cpu_flags", lambda: "some other cpu")
    assert build.build_tag() != tag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_gemv_is_the_dequantised_product(dtype, with_bias):
    """linear_int8: y = x @ (q * scales)^T (+ b) for one row, q int8 [N, K], scales [N]
    bfloat16 (layers/quant.py's layout); more rows are left to torch (None)."""
    torch.manual_seed(3)
    q = torch.randint(-127, 128, (80, 64), dtype=torch.int8)
    scales = (torch.rand(80) * 0.01 + 0.001).to(torch.bfloat16)
    bias = torch.randn(80) if with_bias else None
    x = torch.randn(1, 64).to(dtype)
    with torch.no_grad():
        got = kernels.linear_int8(x, q, scales, bias)
        assert kernels.linear_int8(torch.randn(2, 64).to(dtype), q, scales, bias) is None
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    if bias is not None:
        want = want + bias.double()
    assert got.dtype == dtype and got.shape == (1, 80)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - want).abs().max() / want.abs().max()) < tol


def test_int8_quantlinear_decode_row_takes_the_gemv_and_matches_torchs_kernel(monkeypatch):
    from lorafleet.layers.quant import QuantLinear

    torch.manual_seed(4)
    layer = QuantLinear(torch.nn.Linear(64, 48).to(torch.bfloat16), "int8")
    calls = []
    real = kernels.linear_int8
    monkeypatch.setattr(
        kernels, "linear_int8", lambda x, *a: calls.append(x.shape[0]) or real(x, *a)
    )
    x = torch.randn(1, 64).to(torch.bfloat16)
    with torch.no_grad():
        ours = layer(x)
        theirs = torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales)
    assert calls == [1]
    theirs = theirs + layer.bias.to(theirs.dtype)
    assert (ours.float() - theirs.float()).abs().max() < 0.05 * theirs.float().abs().max()
