"""Bat (PEFT MiSS, init_weights="bat"): W' = W (I + b) + b per r x r block, beside Bone."""

from __future__ import annotations

import pytest
import torch
from helpers import logits, randomize_adapter
from peft import PeftModel

from lorafleet.adapters import (
    MethodConfig,
    adapter_from_model,
    load_adapter,
    new_adapter,
    write_adapter,
)
from lorafleet.errors import LorafleetError
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama

ATOL = 1e-5


def _fresh(tokenizer):
    return tiny_llama(0, vocab_size=len(tokenizer))


def test_bat_zero_init_gives_the_base_logits_exactly(tokenizer, input_ids):
    base = logits(_fresh(tokenizer), input_ids)
    model = new_adapter(_fresh(tokenizer), MethodConfig("bat", rank=8))
    config = model.peft_config["default"]
    assert config.peft_type.value == "MISS" and config.init_weights == "bat"
    block = model.base_model.model.model.layers[0].mlp.up_proj.miss_block["default"]
    assert block.shape == (128 // 8, 8, 8)  # (out / r) x r x r, out * r parameters
    assert torch.equal(logits(model.eval(), input_ids), base)


def test_bat_block_formula(tokenizer):
    """PEFT's merged weight is the paper's block form (its delta depends on W)."""
    bat = new_adapter(_fresh(tokenizer), MethodConfig("bat", rank=8))
    randomize_adapter(bat, scale=0.05)
    w = bat.base_model.model.model.layers[0].self_attn.q_proj
    b = w.miss_block["default"]  # [out/r, r, r]
    W = w.base_layer.weight
    r = 8
    # Block (i, j) of W' is W_ij (I + b_i) + b_i.
    want = W[:r, r : 2 * r] @ (torch.eye(r) + b[0]) + b[0]
    merged = W.detach().clone() + w.get_delta_weight("default", W.detach().clone())
    torch.testing.assert_close(merged[:r, r : 2 * r], want.detach(), atol=ATOL, rtol=0)


def test_bat_save_load_and_merge_round_trip(tokenizer, input_ids, tmp_path):
    base_model = _fresh(tokenizer)
    ours = new_adapter(base_model, MethodConfig("bat", rank=8))
    randomize_adapter(ours, scale=0.05)
    ours.eval()
    expected = logits(ours, input_ids)
    assert (expected - logits(_fresh(tokenizer), input_ids)).abs().max() > 1e-3
    write_adapter(
        tmp_path, adapter_from_model(ours, base_fingerprint=fingerprint(_fresh(tokenizer)))
    )

    adapter, loaded = load_adapter(tmp_path, _fresh(tokenizer))
    assert adapter.method == "bat"
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=ATOL, rtol=0)
    theirs = PeftModel.from_pretrained(_fresh(tokenizer), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=ATOL, rtol=0)

    # Merge: the merged weights give the same logits; unmerge ((W' - b)(I + b)^-1) gives W back.
    before = {n: p.detach().clone() for n, p in loaded.named_parameters() if "base_layer" in n}
    loaded.merge_adapter()
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=ATOL, rtol=0)
    loaded.unmerge_adapter()
    for name, p in loaded.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=ATOL, rtol=0)


def test_bat_refuses_a_rank_that_does_not_tile_the_weights(tokenizer):
    with pytest.raises(LorafleetError, match=r"bat needs .* 24x24 blocks; .*q_proj is 64x64"):
        new_adapter(_fresh(tokenizer), MethodConfig("bat", rank=24))
