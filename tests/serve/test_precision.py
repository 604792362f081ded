"""The engine in bfloat16 and with int8 / int4 base linears: logits near float32's, adapters
still applied, greedy tokens kept on the tiny model, bad settings refused in one line."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import PROMPTS, tiny_base

from lorafleet.adapters import attach
from lorafleet.errors import LorafleetError
from lorafleet.layers import QuantLinear, weight_bytes
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine, SamplingParams, Sequence

# max |logit - float32 logit| on the tiny model (logits span about +-5), measured over 3 prompts
# with and without an adapter: 0.13 (bfloat16), 0.07 (int8), 0.09 (bfloat16 + int8), 0.94 (int4;
# the tiny model's random weights are harder to quantise than trained ones); bounds ~2x that.
BOUNDS = {
    ("bfloat16", "none"): 0.25,
    ("float32", "int8"): 0.15,
    ("float32", "int4"): 2.0,
    ("bfloat16", "int8"): 0.2,
    ("bfloat16", "int4"): 2.0,
}


def _last_logits(engine: Engine, ids: list[int], adapter: str | None = None) -> torch.Tensor:
    """The engine runner's logits at the prompt's last position (one prefill step)."""
    seq = Sequence(0, ids, adapter, SamplingParams())
    seq.kv_slot, seq.lora_slot = engine.kv.allocate(), engine.slot_of(adapter)
    try:
        return engine.runner.run([seq], [])[0]
    finally:
        engine.kv.free(seq.kv_slot)


@pytest.fixture(scope="module")
def reference(tokenizer, adapters):
    """float32 transformers logits at the last prompt position: (adapter or None, ids)."""
    models = {}

    @torch.no_grad()
    def run(adapter, ids):
        if adapter not in models:
            model = tiny_llama(0, vocab_size=len(tokenizer))
            models[adapter] = model if adapter is None else attach(model, adapters[adapter])
        return models[adapter](input_ids=torch.tensor([ids])).logits[0, -1]

    return run


@pytest.mark.parametrize("dtype,quantize", list(BOUNDS))
def test_logits_stay_near_float32_with_and_without_an_adapter(
    tokenizer, adapters, reference, dtype, quantize
):
    engine = Engine(
        tiny_base(tokenizer),
        max_slots=2,
        max_rank=8,
        max_seq_len=64,
        dtype=dtype,
        quantize=quantize,
    )
    engine.load_adapter("lora4", adapters["lora4"])  # float32 tensors, cast into the slots
    layer = engine.handle.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.dtype == engine.kv.k.dtype == getattr(torch, dtype)
    assert isinstance(layer.base_layer, QuantLinear) == (quantize != "none")
    worst = 0.0
    for adapter in (None, "lora4"):
        for text in PROMPTS[:3]:
            ids = tokenizer(text)["input_ids"]
            got, want = _last_logits(engine, ids, adapter), reference(adapter, ids)
            worst = max(worst, (got - want).abs().max().item())
            assert worst < BOUNDS[(dtype, quantize)], (adapter, text, worst)
    # the adapter still moves the logits, by more than the reduced precision does
    ids = tokenizer(PROMPTS[0])["input_ids"]
    delta = (_last_logits(engine, ids, "lora4") - _last_logits(engine, ids)).abs().max()
    assert delta > 2 * worst


def test_greedy_tokens_match_float32_with_int8(tokenizer, adapters):
    """Greedy tokens (prefill and decode paths) against float32's: measured 31 of 32 the same
    with int8. int4 is not checked here: on the tiny model's random weights its logit error
    (~0.9) is as large as the gaps between top tokens, so greedy output is not stable there
    (measured 6 of 32); its logits are bounded above."""
    quantize = "int8"
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    runs = {}
    for q in ("none", quantize):
        engine = Engine(tiny_base(tokenizer), max_slots=2, max_rank=8, max_seq_len=64, quantize=q)
        engine.load_adapter("lora4", adapters["lora4"])
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        outs = engine.generate([(p, a, params) for p in prompts for a in (None, "lora4")])
        runs[q] = [o.token_ids for o in outs]
    pairs = zip(runs["none"], runs[quantize], strict=True)
    agree = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
    total = sum(len(x) for x in runs["none"])
    assert agree / total >= 0.9, runs


def test_quantised_weights_take_fewer_bytes(tokenizer):
    sizes = {}
    for q in ("none", "int8", "int4"):
        engine = Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=32, quantize=q)
        sizes[q] = weight_bytes(engine.base.model)
        assert engine.quantization["quantized"] == (0 if q == "none" else 14)
    linear = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # 2 layers: q, o; k, v; the MLP
    assert sizes["none"] - sizes["int8"] == pytest.approx(linear * (4 - 1), rel=0.02)
    assert sizes["int8"] > sizes["int4"]


def test_bad_settings_are_refused_in_one_line(tokenizer):
    with pytest.raises(LorafleetError, match="unknown quantisation 'int3'"):
        Engine(tiny_base(tokenizer), quantize="int3")
    with pytest.raises(LorafleetError, match="unknown dtype 'float16'"):
        Engine(tiny_base(tokenizer), dtype="float16")
