"""The engine end to end on a tiny Llama: greedy parity with transformers + PEFT, continuous
batching, cancellation, admission limits, adapter failures, sampling and stop rules."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import run_to_end, tiny_base
from transformers import GPT2Config, GPT2LMHeadModel

from lorafleet.adapters import Adapter
from lorafleet.errors import LorafleetError
from lorafleet.models import Base
from lorafleet.serve import Engine, SamplingParams, TokenEvent

GREEDY = SamplingParams(max_tokens=12)


def assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert (stats["waiting"], stats["running"]) == (0, 0)
    assert stats["kv_used_slots"] == 0
    assert stats["kv_free_slots"] == engine.kv.max_seqs


def test_greedy_parity_many_adapters_in_one_batch(make_engine, reference, prompt_ids):
    engine = make_engine(max_batch_size=8)
    plan = [None, "lora4", "rslora8", "attn2", "lora4", "rslora8"]
    requests = [(ids, name, GREEDY) for ids, name in zip(prompt_ids, plan, strict=True)]
    ids = [engine.add_request(*r) for r in requests]
    engine.step()
    assert engine.stats()["running"] == len(plan)  # all prefilled together in the first step
    outputs = run_to_end(engine)
    for rid, (prompt, name, _) in zip(ids, requests, strict=True):
        assert outputs[rid].token_ids == reference(name, prompt), name
        assert outputs[rid].adapter == name
    # Not vacuous: on one prompt every adapter (and the base) gives different tokens.
    assert len({tuple(reference(name, prompt_ids[0])) for name in set(plan)}) == 4
    assert_idle(engine)
    # generate() gives the same, in input order.
    again = engine.generate(requests[::-1])
    assert [o.token_ids for o in again] == [reference(n, p) for p, n, _ in requests[::-1]]


def test_requests_join_mid_flight(make_engine, reference, prompt_ids, tokenizer):
    engine = make_engine(max_batch_size=4)
    events: dict[int, list[TokenEvent]] = {}

    def add(ids, name):
        rid = engine.add_request(ids, name, GREEDY, on_token=lambda e: events[rid].append(e))
        events[rid] = []
        return rid, ids, name

    first = [add(prompt_ids[0], "lora4"), add(prompt_ids[1], None)]
    outputs = {}
    for _ in range(4):
        outputs.update((o.request_id, o) for o in engine.step())
    later = [add(prompt_ids[2], "attn2"), add(prompt_ids[4], "rslora8")]
    assert engine.stats()["waiting"] == 2
    engine.step()
    assert engine.stats()["running"] == 4  # joined the running batch between steps
    outputs.update(run_to_end(engine))
    for rid, ids, name in first + later:
        out = outputs[rid]
        assert out.token_ids == reference(name, ids), name
        assert [e.token_id for e in events[rid]] == out.token_ids
        assert "".join(e.text for e in events[rid]) == out.text
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert events[rid][-1].finished and events[rid][-1].finish_reason == "length"
        assert not any(e.finished for e in events[rid][:-1])
    assert_idle(engine)


def test_cancel_frees_kv_and_others_finish(make_engine, reference, prompt_ids):
    engine = make_engine(max_batch_size=4)
    plan = [(prompt_ids[0], "lora4"), (prompt_ids[1], "rslora8"), (prompt_ids[3], None)]
    events = []
    ids = [
        engine.add_request(p, n, GREEDY, events.append if n == "rslora8" else None) for p, n in plan
    ]
    fourth = engine.add_request(prompt_ids[5], "attn2", GREEDY)
    engine.step()
    engine.step()
    assert engine.stats()["kv_used_slots"] == 4
    assert engine.cancel(ids[1])  # the middle KV slot: the others now decode through a gather
    assert engine.stats()["kv_used_slots"] == 3
    assert events[-1].finished and events[-1].finish_reason == "cancelled"
    assert not engine.cancel(ids[1])
    assert not engine.cancel(12345)
    outputs = run_to_end(engine)
    cancelled = outputs[ids[1]]
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == 2
    for rid, (prompt, name) in zip(ids, plan, strict=True):
        if rid != ids[1]:
            assert outputs[rid].token_ids == reference(name, prompt)
    assert outputs[fourth].token_ids == reference("attn2", prompt_ids[5])
    assert_idle(engine)
    # A waiting request can be cancelled too; it never takes KV memory.
    engine2 = make_engine(max_batch_size=1)
    a = engine2.add_request(prompt_ids[0], None, GREEDY)
    b = engine2.add_request(prompt_ids[1], None, GREEDY)
    engine2.step()
    assert engine2.cancel(b)
    assert run_to_end(engine2)[b].finish_reason == "cancelled"
    assert_idle(engine2)
    assert a != b


def test_admission_respects_batch_size_and_token_budget(make_engine, reference, tokenizer):
    prompt = tokenizer("one two three four five six seven")["input_ids"]
    n = len(prompt)
    engine = make_engine(max_batch_size=3, max_batch_tokens=2 * n + 1)
    ids = [engine.add_request(prompt, name, GREEDY) for name in ["lora4", None, "attn2", None]]
    engine.step()
    assert (engine.stats()["running"], engine.stats()["waiting"]) == (2, 2)  # token budget
    engine.step()
    assert (engine.stats()["running"], engine.stats()["waiting"]) == (3, 1)  # batch size
    assert engine.stats()["kv_free_slots"] == 0
    outputs = run_to_end(engine)
    for rid, name in zip(ids, ["lora4", None, "attn2", None], strict=True):
        assert outputs[rid].token_ids == reference(name, prompt)
    assert_idle(engine)
    # Prompts that can never fit fail alone; length stops at max_seq_len.
    small = make_engine(max_batch_tokens=n, max_seq_len=n + 3)
    too_long = small.add_request(prompt + prompt, None, GREEDY)
    empty = small.add_request([], None, GREEDY)
    bad_id = small.add_request([len(tokenizer) + 5], None, GREEDY)
    ok = small.add_request(prompt, None, GREEDY)
    outputs = run_to_end(small)
    assert "max_seq_len" in outputs[too_long].error
    assert "empty" in outputs[empty].error
    assert "outside the vocabulary" in outputs[bad_id].error
    assert outputs[ok].finish_reason == "length"
    assert outputs[ok].token_ids == reference(None, prompt)[:3]
    budget = make_engine(max_batch_tokens=n - 1)
    rid = budget.add_request(prompt, None, GREEDY)
    assert "max_batch_tokens is" in run_to_end(budget)[rid].error


class SlowRegistry:
    """An AdapterSource that 'loads' an adapter after a few asks; unknown names fail."""

    def __init__(self, engine, adapters, delay=2):
        self.engine, self.adapters, self.delay, self.asks = engine, adapters, delay, 0

    def prepare(self, name):
        if name not in self.adapters:
            return f"no adapter named {name}"
        self.asks += 1
        if self.asks > self.delay:
            self.engine.load_adapter(name, self.adapters[name])
        return None


def test_unknown_adapter_fails_only_its_request(make_engine, reference, prompt_ids, adapters):
    engine = make_engine(load=["lora4"])
    good = engine.add_request(prompt_ids[0], "lora4", GREEDY)
    bad = engine.add_request(prompt_ids[1], "nope", GREEDY)
    base = engine.add_request(prompt_ids[2], None, GREEDY)
    outputs = run_to_end(engine)
    assert outputs[bad].finish_reason == "error" and outputs[bad].token_ids == []
    assert outputs[bad].error == "unknown adapter 'nope' (loaded: lora4)"
    assert outputs[good].token_ids == reference("lora4", prompt_ids[0])
    assert outputs[base].token_ids == reference(None, prompt_ids[2])
    # With a source (the registry's hook) a cold adapter waits, then runs; unknown ones fail.
    engine = make_engine(load=[])
    engine.attach_adapter_source(SlowRegistry(engine, {"rslora8": adapters["rslora8"]}))
    cold = engine.add_request(prompt_ids[3], "rslora8", GREEDY)
    missing = engine.add_request(prompt_ids[3], "ghost", GREEDY)
    warm = engine.add_request(prompt_ids[4], None, GREEDY)
    outputs = {o.request_id: o for o in engine.step()}
    assert engine.stats()["waiting"] == 1 and engine.stats()["running"] == 1
    outputs.update(run_to_end(engine))
    assert outputs[missing].error == "no adapter named ghost"
    assert outputs[cold].token_ids == reference("rslora8", prompt_ids[3])
    assert outputs[warm].token_ids == reference(None, prompt_ids[4])
    assert_idle(engine)


def test_adapter_in_use_is_never_unloaded(make_engine, reference, prompt_ids, adapters):
    engine = make_engine(load=["lora4", "attn2"], max_slots=2)
    rid = engine.add_request(prompt_ids[0], "lora4", GREEDY)
    engine.step()
    assert engine.adapter_in_use("lora4") == 1
    with pytest.raises(LorafleetError, match="in use by 1 running request"):
        engine.unload_adapter("lora4")
    with pytest.raises(LorafleetError, match="in use"):
        engine.load_adapter("lora4", adapters["rslora8"])
    with pytest.raises(LorafleetError, match="all 2 adapter slots are taken"):
        engine.load_adapter("rslora8", adapters["rslora8"])
    engine.unload_adapter("attn2")  # idle: fine, and its slot is free again
    assert engine.load_adapter("rslora8", adapters["rslora8"]) == 2
    assert run_to_end(engine)[rid].token_ids == reference("lora4", prompt_ids[0])
    engine.unload_adapter("lora4")
    assert engine.loaded_adapters() == {"rslora8": 2}
    with pytest.raises(LorafleetError, match="not loaded"):
        engine.unload_adapter("lora4")
    other = adapters["lora4"]
    foreign = Adapter(config=other.config, tensors=other.tensors, meta={"base_fingerprint": "x"})
    with pytest.raises(LorafleetError, match="trained on another base"):
        engine.load_adapter("foreign", foreign)
    # A request waiting for an adapter that gets unloaded fails alone (no source to reload).
    engine = make_engine(load=["attn2"], max_batch_size=1)
    first = engine.add_request(prompt_ids[0], None, GREEDY)
    queued = engine.add_request(prompt_ids[1], "attn2", GREEDY)
    engine.step()
    engine.unload_adapter("attn2")
    outputs = run_to_end(engine)
    assert "unknown adapter 'attn2'" in outputs[queued].error
    assert outputs[first].finish_reason == "length"


SAMPLED = dict(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9)


def test_seeded_sampling_is_reproducible(make_engine, prompt_ids):
    def run(batch_with_others: bool, seed=7):
        engine = make_engine(seed=123)
        rid = engine.add_request(prompt_ids[0], "lora4", SamplingParams(seed=seed, **SAMPLED))
        if batch_with_others:
            engine.add_request(prompt_ids[1], "rslora8", SamplingParams(**SAMPLED))
            engine.add_request(prompt_ids[2], None, GREEDY)
        return run_to_end(engine)[rid].token_ids

    alone = run(False)
    assert alone == run(False)
    assert alone == run(True)  # its own generator: the batch around it does not matter
    assert alone != run(False, seed=8)


def test_tiny_temperatures_sample_greedily_not_nan(make_engine, prompt_ids):
    # Found by the API fuzz test: temperature 1e-45 overflowed the logits to inf -> NaN -> 500.
    def tokens(temperature):
        engine = make_engine(seed=0)
        params = SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True)
        rid = engine.add_request(prompt_ids[0], "lora4", params)
        return run_to_end(engine)[rid].token_ids

    greedy = tokens(0.0)
    assert tokens(1e-45) == greedy and tokens(5e-6) == greedy


def test_half_precision_logits_sample_in_float32():
    from lorafleet.serve.sampler import sample
    from lorafleet.serve.sequence import Sequence

    logits = torch.tensor([[0.0, 20.0, 19.9, -5.0]], dtype=torch.float16)  # / 1e-4 > fp16 max
    seq = Sequence(0, [1], None, SamplingParams(temperature=1e-4, seed=3))
    assert sample(logits, [seq], None) == [1]


def test_stop_ids_and_stop_strings(make_engine, reference, prompt_ids, tokenizer):
    ref = reference("lora4", prompt_ids[0])
    engine = make_engine()
    by_id = engine.add_request(prompt_ids[0], "lora4", SamplingParams(12, stop_token_ids=[ref[3]]))
    out = run_to_end(engine)[by_id]
    cut = ref.index(ref[3]) + 1
    assert out.finish_reason == "stop" and out.token_ids == ref[:cut]
    assert out.text == tokenizer.decode(ref[: cut - 1], skip_special_tokens=True)
    full = tokenizer.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and "\ufffd" not in full
    events = []
    rid = engine.add_request(
        prompt_ids[0], "lora4", SamplingParams(12, stop=[stop, "\x00never"]), events.append
    )
    out = run_to_end(engine)[rid]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]
    assert "".join(e.text for e in events) == out.text  # the stream never showed the stop
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) < len(ref)
    assert_idle(engine)


def test_failed_forward_fails_its_batch_not_the_engine(
    make_engine, reference, prompt_ids, monkeypatch
):
    engine = make_engine()
    first = engine.add_request(prompt_ids[0], "lora4", GREEDY)

    def boom(inputs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.runner, "forward", boom)
    (failed,) = engine.step()
    assert failed.request_id == first and "RuntimeError: out of memory" in failed.error
    assert_idle(engine)
    monkeypatch.undo()
    later = engine.add_request(prompt_ids[1], "rslora8", GREEDY)
    assert run_to_end(engine)[later].token_ids == reference("rslora8", prompt_ids[1])


def test_callback_error_fails_only_its_request(make_engine, reference, prompt_ids):
    engine = make_engine()

    def broken(event):
        raise RuntimeError("client went away")

    bad = engine.add_request(prompt_ids[0], "lora4", GREEDY, on_token=broken)
    good = engine.add_request(prompt_ids[1], "attn2", GREEDY)
    outputs = run_to_end(engine)
    assert outputs[bad].finish_reason == "error" and "client went away" in outputs[bad].error
    assert outputs[good].token_ids == reference("attn2", prompt_ids[1])
    assert_idle(engine)


def test_unsupported_architecture_is_refused(tokenizer):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    base = Base("gpt2-tiny", model, tokenizer, "gpt2-x", None, False, 0.0)
    with pytest.raises(LorafleetError) as err:
        Engine(base)
    assert str(err.value) == (
        "model type gpt2 is not supported by the engine (supported: llama, gemma3_text, qwen2, "
        "qwen3, mistral, ministral, phi3, starcoder2, arcee)"
    )
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Module)  # left untouched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"seed": "7"},
        {"stop": [""]},
        {"stop_token_ids": [-1]},
        {"temperature": float("nan")},
    ],
)
def test_sampling_params_are_checked(kwargs):
    with pytest.raises(LorafleetError):
        SamplingParams(**kwargs)


def test_engine_options_are_checked(tokenizer):
    for kwargs in ({"max_batch_size": 0}, {"max_seq_len": 1}, {"max_seq_len": 10**6}):
        with pytest.raises(LorafleetError):
            Engine(tiny_base(tokenizer), **kwargs)
    engine = Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=32)  # base only
    assert engine.generate([([1, 2, 3], None, SamplingParams(2))])[0].finish_reason == "length"
    with pytest.raises(LorafleetError, match="no adapter slots"):
        engine.load_adapter("x", None)
