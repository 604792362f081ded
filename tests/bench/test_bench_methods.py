"""bench multilora's per-method layers compute each method's output; bench train --method checks
its methods (no timings are asserted)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.bench.multilora_methods import method_layers, method_records, supported
from lorafleet.cli import main


def _linears(seed: int = 0) -> dict[str, nn.Linear]:
    torch.manual_seed(seed)
    return {"l0.q_proj": nn.Linear(32, 32), "l0.up_proj": nn.Linear(32, 64, bias=False)}


def _stacks(named, k, r, gen):
    return [
        (
            torch.randn(k + 1, r, lin.in_features, generator=gen) / 8,
            torch.randn(k + 1, r, lin.out_features, generator=gen) / 8,
        )
        for lin in named.values()
    ]


@torch.no_grad()
def test_method_rows_match_each_method_and_differ_from_lora():
    named, r, k = _linears(), 8, 4
    gen = torch.Generator().manual_seed(1)
    stacks = _stacks(named, k, r, gen)
    x = torch.randn(k, 32, generator=gen)
    outs = {}
    for method in ("dora", "bone", "bat", "mixed"):
        context, layers = method_layers(named, stacks, method, k, r, torch.Generator())
        context.set_slots(list(range(1, k + 1)))  # row i uses slot i + 1
        outs[method] = [layer(x) for layer in layers]
    lora_ctx, lora = method_layers(named, stacks, "mixed", 1, r, torch.Generator())  # slot 1: LoRA
    lora_ctx.set_slots([1] * k)
    for layer, (A, Bt), lin in zip(lora, stacks, named.values(), strict=True):
        expected = lin(x) + 2.0 * (x @ A[1].T) @ Bt[1]
        torch.testing.assert_close(layer(x)[0], expected[0])
    # Bone row: y = W x + b + (sum of x's r-chunks) @ block, block = B^T (A is [I_r ... I_r]).
    bone_ctx, bone = method_layers(named, stacks, "bone", k, r, torch.Generator())
    bone_ctx.set_slots(list(range(1, k + 1)))
    for layer, lin in zip(bone, named.values(), strict=True):
        chunks = x.reshape(k, -1, r).sum(1)  # [k, r]
        block = layer.lora_Bt[1, :r]  # slot 1's block at scale 1: [r, d_out]
        torch.testing.assert_close(layer(x)[0], lin(x)[0] + chunks[0] @ block)
    # Mixed: row 0 (slot 1) is LoRA, row 3 (slot 4) is Bat: its dense delta is applied.
    for out, lin in zip(outs["mixed"], named.values(), strict=True):
        assert not torch.allclose(out[3], lin(x)[3])
    for method in ("dora", "bat"):
        for out, lin in zip(outs[method], named.values(), strict=True):
            assert not torch.allclose(out, lin(x)), method


def test_bat_is_capped_and_needs_divisible_dims():
    lins = list(_linears().values())
    assert supported("bat", 4, lins, 8) and not supported("bat", 5, lins, 8)
    assert not supported("bat", 2, lins, 12)  # 12 does not divide 32
    assert supported("mixed", 16, lins, 8) and supported("dora", 16, lins, 12)
    t = {"base": 1.0, "ours": 2.0, "method_bat": 4.0}
    (rec,) = method_records("decode", 2, 10, t, {"bat": []})
    assert rec["vs_lora"] == 0.5 and rec["path"] == "bat"


@pytest.mark.parametrize(
    "args", [["bench", "train", "--method", "nope"], ["bench", "multilora", "--method", "nope"]]
)
def test_unknown_method_is_a_one_line_error(args, capsys):
    assert main([*args, "--base", "default"]) == 2
    err = capsys.readouterr().err
    assert "unknown --method 'nope'" in err and len(err.strip().splitlines()) == 1
