"""oneDNN-packed weight copies (kernels/packed.py): F.linear's product at every row bucket and
chunk, the GEMV's rows left alone, stale or replaced weights falling back, bounded row counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet import kernels
from lorafleet.kernels import build, packed

pytestmark = pytest.mark.skipif(not packed.supported(), reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def no_copies_left():
    packed.unpack_all()
    yield
    packed.unpack_all()


def relative(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [5, 16, 17, 100, 256, 257, 700])
def test_packed_product_is_f_linear(dtype, tol, rows):
    torch.manual_seed(rows)
    weight = (torch.randn(96, 64) * 0.1).to(dtype)
    bias = torch.randn(96).to(dtype)
    assert kernels.pack(weight)
    x = torch.randn(rows, 64).to(dtype)
    assert packed.copy_for(x, weight) is not None
    got = kernels.linear(x, weight, bias)
    want = F.linear(x.double(), weight.double(), bias.double())
    assert got.shape == (rows, 96) and got.dtype == dtype and got.is_contiguous()
    assert relative(got, want) < tol
    x3 = x.view(1, rows, 64)  # leading dims are kept
    assert torch.equal(kernels.linear(x3, weight, bias)[0], got)


def test_the_gemvs_rows_and_unpacked_weights_do_not_use_a_copy():
    weight = torch.randn(32, 64)
    kernels.pack(weight)
    assert packed.copy_for(torch.randn(packed.GEMV_ROWS, 64), weight) is None
    assert packed.copy_for(torch.randn(20, 64).double(), weight) is None  # another dtype
    assert packed.copy_for(torch.randn(20, 64), torch.randn(32, 64)) is None  # never packed


def test_a_modified_or_replaced_weight_falls_back_to_its_own_values():
    weight = torch.randn(32, 64)
    kernels.pack(weight)
    x = torch.randn(20, 64)
    with torch.no_grad():
        weight.mul_(2)  # in place: the copy is stale now
    assert packed.copy_for(x, weight) is None
    assert torch.allclose(kernels.linear(x, weight), F.linear(x, weight), atol=1e-5)
    key = id(weight)
    del weight  # its entry goes with it
    assert key not in packed._packed


def test_gradients_and_the_switch_skip_the_copy(monkeypatch):
    weight = torch.randn(32, 64, requires_grad=True)
    kernels.pack(weight)
    x = torch.randn(20, 64)
    assert packed.copy_for(x, weight) is None  # grad wanted: torch's op, differentiable
    with torch.no_grad():
        assert packed.copy_for(x, weight) is not None
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    assert not kernels.pack(torch.randn(8, 16))
    assert not kernels.pack(torch.randn(8, 16).half())


def test_row_counts_reaching_onednn_are_bucketed(monkeypatch):
    """Every product shape oneDNN sees has a row count from a small set (it keeps memory per
    shape): GEMV_ROWS < m <= CHUNK_ROWS padded to a multiple of ROW_BUCKET, chunks above."""
    weight = torch.randn(32, 64)
    kernels.pack(weight)
    seen = set()
    real = packed.onednn_linear

    def spy(x, *args):
        seen.add(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(packed, "onednn_linear", spy)
    for rows in range(packed.GEMV_ROWS + 1, 1100, 3):
        kernels.linear(torch.randn(rows, 64), weight)
    assert seen <= set(range(packed.ROW_BUCKET, packed.CHUNK_ROWS + 1, packed.ROW_BUCKET))
