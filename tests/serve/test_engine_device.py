"""Every tensor the engine makes follows its model's device: the engine built and run with
torch's default device set to `meta` (the model on the CPU) gives the same tokens as without.

A tensor made without device= lands on meta there, and a step that mixes it with the model's
CPU tensors raises, or yields a meta result that cannot be read back: on a GPU, where the
default device (the CPU) is not the model's either, the same tensor would be a slow copy or a
device-mismatch error. No GPU is needed to catch it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from serve_helpers import tiny_base

from lorafleet.errors import LorafleetError
from lorafleet.layers import check_quantize_device
from lorafleet.serve import Engine, SamplingParams
from lorafleet.serve.grammar import GrammarSpec

GREEDY = SamplingParams(max_tokens=8)
SAMPLED = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=7, logprobs=2)
SCHEMA = GrammarSpec.json_schema('{"type": "object", "properties": {"ok": {"type": "boolean"}}}')


def requests(prompt_ids):
    """Single adapters, the base, a fixed mixture, a seeded sampled row with logprobs, a
    grammar row and prompt logprobs: every path of a step."""
    return [
        (prompt_ids[0], None, GREEDY),
        (prompt_ids[1], "lora4", GREEDY),
        (prompt_ids[2], "rslora8", SAMPLED),
        (prompt_ids[3], [("lora4", 0.6), ("attn2", 0.4)], GREEDY),
        (prompt_ids[4], "attn2", SamplingParams(max_tokens=8, grammar=SCHEMA)),
        (prompt_ids[5], "lora4", SamplingParams(max_tokens=4, prompt_logprobs=1)),
    ]


def run(base, adapters, prompt_ids, default_device=None):
    """Build the engine over `base` (its model on the CPU), load the adapters and run every
    request, with torch's default device `default_device` meanwhile (None: as it is)."""
    with torch.device(default_device) if default_device else contextlib.nullcontext():
        if default_device:
            assert torch.zeros(1).device.type == default_device  # the trap is armed
        engine = Engine(base, max_slots=4, max_rank=8, max_seq_len=128, max_batch_size=8)
        try:
            for name, adapter in adapters.items():
                engine.load_adapter(name, adapter)
            outs = engine.generate(requests(prompt_ids))
        finally:
            engine.close()
    return [(o.token_ids, o.finish_reason, o.logprobs, o.prompt_logprobs) for o in outs]


def test_the_engine_makes_no_tensor_on_the_default_device(
    tokenizer, adapters, prompt_ids, reference
):
    expected = run(tiny_base(tokenizer), adapters, prompt_ids)
    assert expected[1][0] == reference("lora4", prompt_ids[1], 8)  # the plain run is right
    assert all(reason != "error" for _, reason, _, _ in expected)
    got = run(tiny_base(tokenizer), adapters, prompt_ids, default_device="meta")
    assert got == expected


def test_quantised_base_needs_the_cpu():
    check_quantize_device("none", "meta")
    check_quantize_device("int8", "cpu")
    for mode in ("int8", "int4"):
        with pytest.raises(LorafleetError, match=f"--quantize {mode} runs on torch's CPU"):
            check_quantize_device(mode, torch.device("meta"))
