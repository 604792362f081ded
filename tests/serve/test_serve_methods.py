"""Every method we train served in one batch: LoRA, DoRA, Bone and Bat rows side by side equal
PEFT's own output per row (logits to 1e-5, float32) and its greedy tokens through the engine."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, MissConfig
from serve_helpers import (
    TARGETS,
    greedy_matches_peft,
    peft_reference,
    run_to_end,
    tiny_base,
    written_adapters,
)

from lorafleet.layers import RowMixture, inject_multilora
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine, SamplingParams

CONFIGS = {
    "lora4": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "dora4": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
    "bone8": lambda: MissConfig(r=8, target_modules=TARGETS),
    "bat8": lambda: MissConfig(r=8, init_weights="bat", target_modules=TARGETS),
}
SCALES = {"lora4": 0.2, "dora4": 0.2, "bone8": 0.05, "bat8": 0.05}


@pytest.fixture(scope="module")
def method_adapters(tokenizer, tmp_path_factory):
    """name -> Adapter with random non-zero weights, written and read back as a server would."""

    def randomize(model, seed, name):
        randomize_adapter(model, seed=seed, scale=SCALES[name])

    return written_adapters(tokenizer, tmp_path_factory.mktemp("methods"), CONFIGS, randomize, 60)


@torch.no_grad()
def test_rows_of_every_method_match_peft_in_one_batch(tokenizer, method_adapters):
    model = tiny_llama(0, vocab_size=len(tokenizer))
    handle = inject_multilora(model, max_slots=4, max_rank=8)
    names = list(CONFIGS)
    for slot, name in enumerate(names, start=1):
        handle.load_slot(slot, method_adapters[name])
    q = handle.layers["model.layers.0.self_attn.q_proj"]
    assert q.ranks == [0, 4, 4, 8, 0] and set(q.ratios) == {2} and set(q.dense) == {4}
    assert [handle.mixable(s) for s in (1, 2, 3, 4)] == [True, False, True, False]

    ids = torch.tensor([tokenizer("The film was a delight from start to finish.")["input_ids"]])
    row_slots = [0, 1, 2, 3, 4, 2, 4, 1]
    refs = {
        s: peft_reference(tokenizer, method_adapters[n] if s else None)(input_ids=ids).logits[0]
        for s, n in enumerate([None, *names])
    }
    for s in (1, 2, 3, 4):  # every adapter moves the logits, and DoRA is not its plain LoRA
        assert (refs[s] - refs[0]).abs().max() > 1e-2, s
    batch = ids.repeat(len(row_slots), 1)
    want = torch.stack([refs[s] for s in row_slots])
    for path in (None, "segmented", "gathered"):
        handle.context.path = path
        with handle.slots(row_slots):
            got = model(input_ids=batch).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=str(path))
    # Clearing the DoRA and Bat slots drops their ratio and delta: those rows are the base.
    handle.clear_slot(2)
    handle.clear_slot(4)
    with handle.slots([2, 4]):
        got = model(input_ids=ids.repeat(2, 1)).logits
    torch.testing.assert_close(got, refs[0].expand(2, -1, -1), atol=0, rtol=0)


@torch.no_grad()
def test_dora_and_bat_slots_refuse_to_be_mixed(tokenizer, method_adapters):
    model = tiny_llama(0, vocab_size=len(tokenizer))
    handle = inject_multilora(model, max_slots=2, max_rank=8)
    handle.load_slot(1, method_adapters["lora4"])
    handle.load_slot(2, method_adapters["dora4"])
    ids = torch.tensor([[1, 2, 3]])
    with (
        pytest.raises(ValueError, match="slot 2 holds a DoRA or Bat adapter"),
        handle.slots([0], [RowMixture(rows=[0], slots=[1, 2], weights=[0.5, 0.5])]),
    ):
        model(input_ids=ids)


def test_engine_greedy_parity_for_every_method(tokenizer, method_adapters, prompt_ids):
    engine = Engine(tiny_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=128)
    for name, adapter in method_adapters.items():
        engine.load_adapter(name, adapter)
    plan = [None, "lora4", "dora4", "bone8", "bat8", "dora4"]
    seen = greedy_matches_peft(engine, tokenizer, method_adapters, plan, prompt_ids)
    assert len(seen) >= 5  # the methods differ from each other and the base


def test_engine_fails_a_mixture_with_a_dora_part_alone(tokenizer, method_adapters, prompt_ids):
    engine = Engine(tiny_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=128)
    for name in ("lora4", "dora4", "bat8"):
        engine.load_adapter(name, method_adapters[name])
    params = SamplingParams(max_tokens=4)
    ok = engine.add_request(prompt_ids[0], "lora4", params)
    dora_mix = engine.add_request(prompt_ids[1], [("lora4", 0.5), ("dora4", 0.5)], params)
    bat_mix = engine.add_request(prompt_ids[2], [("bat8", 0.5), ("lora4", 0.5)], params)
    outputs = run_to_end(engine)
    assert outputs[ok].finish_reason == "length" and len(outputs[ok].token_ids) == 4
    for rid, part in ((dora_mix, "dora4"), (bat_mix, "bat8")):
        assert outputs[rid].finish_reason == "error", outputs[rid]
        assert f"adapter {part} (DoRA or Bat) cannot be part of a mixture" in outputs[rid].error
