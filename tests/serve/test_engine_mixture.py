"""Mixture requests in the engine: equal to PEFT's cat merge, mixed batches, pinning, errors."""

from __future__ import annotations

import pytest
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from serve_helpers import GREEDY, TARGETS, run_to_end, tiny_base

from lorafleet.adapters import adapter_from_model, read_adapter
from lorafleet.errors import LorafleetError
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine, SamplingParams
from lorafleet.serve.sequence import Mixture

W = (0.7, -0.4)
MIX = [("one", W[0]), ("two", W[1])]


@pytest.fixture(scope="module")
def cat_adapters(tokenizer) -> dict:
    """Plain LoRA "one" (r=4, every linear) and "two" (r=2, attention), and "mix": PEFT's
    cat merge of 0.7 one - 0.4 two (add_weighted_adapter)."""
    config_one = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    config_two = LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS[:4], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config_one, "one")
    model.add_adapter("two", config_two)
    randomize_adapter(model, seed=11, scale=0.2)
    model.add_weighted_adapter(["one", "two"], list(W), "mix", combination_type="cat")
    return {name: adapter_from_model(model, adapter_name=name) for name in ("one", "two", "mix")}


@pytest.fixture
def engine(tokenizer, cat_adapters):
    engine = Engine(tiny_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=128)
    for name, adapter in cat_adapters.items():
        engine.load_adapter(name, adapter)
    yield engine
    engine.close()


def test_mixture_equals_the_cat_merged_adapter(engine, prompt_ids):
    solo = engine.generate([(p, "mix", GREEDY) for p in prompt_ids])
    mixed = engine.generate([(p, MIX, GREEDY) for p in prompt_ids])
    one = engine.generate([(p, "one", GREEDY) for p in prompt_ids])
    for s, m in zip(solo, mixed, strict=True):
        assert m.finish_reason in ("stop", "length") and m.token_ids == s.token_ids
        assert m.adapter == "one*0.7+two*-0.4"
    assert any(o.token_ids != s.token_ids for o, s in zip(one, solo, strict=True))  # not vacuous


def test_mixed_batch_of_base_single_and_mixture_rows(engine, prompt_ids):
    specs = [None, "one", MIX, "mix", Mixture((("two", 0.5), ("one", 1.5))), "two"]
    which = [0, 1, 2, 2, 4, 5]  # the mixture and "mix" share a prompt
    requests = [(prompt_ids[i], spec, GREEDY) for i, spec in zip(which, specs, strict=True)]
    alone = [engine.generate([r])[0].token_ids for r in requests]  # one request at a time
    ids = [engine.add_request(*r) for r in requests]
    outputs = {o.request_id: o for o in engine.step()}
    assert not engine.scheduler.waiting  # all prefilled in one step, then decoded together
    outputs.update(run_to_end(engine))
    together = [outputs[i] for i in ids]
    assert [o.token_ids for o in together] == alone
    assert together[2].token_ids == alone[3]  # the mixture is the cat merge (same prompt)


def test_one_adapter_at_weight_one_is_that_adapter(engine, prompt_ids):
    plain, as_mix = engine.generate(
        [(prompt_ids[0], "one", GREEDY), (prompt_ids[0], [("one", 1.0)], GREEDY)]
    )
    assert as_mix.adapter == "one" and as_mix.token_ids == plain.token_ids


def test_running_mixture_pins_all_its_adapters(engine, prompt_ids):
    rid = engine.add_request(prompt_ids[1], MIX, SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()  # admitted and prefilled
    assert engine.adapter_in_use("one") == 1 and engine.adapter_in_use("two") == 1
    assert engine.adapter_in_use("mix") == 0
    with pytest.raises(LorafleetError, match="adapter two is in use by 1 running request"):
        engine.unload_adapter("two")
    outputs = run_to_end(engine)
    assert len(outputs[rid].token_ids) == 6
    assert engine.adapter_in_use("two") == 0
    engine.unload_adapter("two")


def test_bad_mixtures(engine, prompt_ids):
    for spec, match in [
        ([("one", float("nan"))], "weight for one must be finite"),
        ([("one", 1.0), ("one", 2.0)], "names an adapter twice"),
        ([], "at least one"),
        ([("one", True)], "must be finite"),
        ([("", 1.0)], "non-empty string"),
    ]:
        with pytest.raises(LorafleetError, match=match) as err:
            engine.add_request(prompt_ids[0], spec)
        assert "\n" not in str(err.value)
    rid = engine.add_request(prompt_ids[0], [("one", 0.5), ("nope", 0.5)], GREEDY)
    out = run_to_end(engine)[rid]
    assert out.finish_reason == "error" and "unknown adapter 'nope'" in out.error
    small = Engine(tiny_base(engine.tokenizer), max_slots=1, max_rank=8, max_seq_len=64)
    rid = small.add_request(prompt_ids[0], MIX, GREEDY)
    assert "the mixture has 2 adapters; there are 1 slots" in run_to_end(small)[rid].error


def test_registry_makes_every_part_resident(make, disk, prompts, tokenizer):
    direct = Engine(tiny_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=128)
    for name in ("lora4", "attn2"):
        direct.load_adapter(name, read_adapter(disk / name))
    mix = [("lora4", 0.6), ("attn2", 0.8)]
    want = direct.generate([(p, mix, GREEDY) for p in prompts[:3]])
    engine, registry = make(max_slots=2)
    engine.generate([(prompts[0], "rslora8", GREEDY), (prompts[1], "lora4b", GREEDY)])
    got = engine.generate([(p, mix, GREEDY) for p in prompts[:3]])  # evicts both residents
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.finish_reason != "error" for o in got)
    assert set(engine.loaded_adapters()) == {"lora4", "attn2"}
