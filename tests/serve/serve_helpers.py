"""Shared pieces of the engine tests (not fixtures): prompts, targets, a fresh tiny base."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from helpers import randomize_adapter
from peft import get_peft_model

from lorafleet.adapters import Adapter, adapter_from_model, attach, read_adapter, write_adapter
from lorafleet.models import Base, fingerprint
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine, SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "The film was a delight from start to finish.",
    "Tell me a joke about cats and dogs please",
    "Hi",
    "Two plus two is",
    "Once upon a time, in a land far away, there lived a",
    "Question: what is the capital of France? Answer:",
]


def record_rows(monkeypatch, owner, name: str) -> list[int]:
    """Wrap `owner.name` (a kernel taking rows [n, ...] first) to record each call's n; the
    list fills as the code under test calls it."""
    calls: list[int] = []
    real = getattr(owner, name)

    def recording(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def tiny_base(tokenizer) -> Base:
    """A fresh tiny Llama (seed 0) as a Base; the engine changes its model in place."""
    model = tiny_llama(0, vocab_size=len(tokenizer))
    return Base("tiny", model, tokenizer, fingerprint(model), None, False, 0.0)


def engine_and_generate_greedy(base: Base, prompt: str, max_tokens: int = 8):
    """Greedy tokens for `prompt` from transformers' generate and from a one-row Engine over
    the same base, as (engine tokens, generate tokens, the engine's runner type); generate runs
    first, since the engine changes the model in place."""
    ids = base.tokenizer(prompt)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = base.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    expected = out[0, x.shape[1] :].tolist()
    engine = Engine(base, max_slots=1, max_rank=4, max_batch_size=1, max_seq_len=64)
    try:
        [result] = engine.generate([(ids, None, SamplingParams(max_tokens=max_tokens))])
    finally:
        engine.close()
    return result.token_ids, expected, type(engine.runner)


class RunnerCheck:
    """Drives `engine.runner.run` step by step and checks every row's logits against a
    reference transformers model per adapter (`refs[None]` = the plain base)."""

    def __init__(self, engine, refs: dict, prompt_ids: list[list[int]], atol: float = 1e-5):
        self.engine, self.refs, self.prompt_ids, self.atol = engine, refs, prompt_ids, atol

    def seq(self, i: int, name: str | None, kv_slot: int):
        from lorafleet.serve import SamplingParams, Sequence

        s = Sequence(i, self.prompt_ids[i], name, SamplingParams())
        s.kv_slot, s.lora_slot = kv_slot, self.engine.slot_of(name)
        return s

    def expected(self, s):
        import torch

        ids = torch.tensor([s.prompt_ids + s.generated])
        return self.refs[s.adapter](input_ids=ids).logits[0, -1]

    def check(self, prefill: list, decode: list) -> None:
        """One engine step; then feed each row's greedy token back, as the engine would."""
        import torch

        logits = self.engine.runner.run(prefill, decode)  # [B, vocab]
        assert logits.shape[0] == len(prefill) + len(decode)
        for s, row in zip(prefill + decode, logits, strict=True):
            torch.testing.assert_close(row, self.expected(s), atol=self.atol, rtol=0)
            s.num_cached = s.num_tokens
            s.generated.append(int(row.argmax()))


# --- registry tests ---

GREEDY = SamplingParams(max_tokens=8)
NAMES = ["attn2", "lora4", "lora4b", "rslora8"]


def peft_adapter(tokenizer, config, seed, fp) -> Adapter:
    """A PEFT adapter on the seed-0 tiny base with random non-zero weights."""
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config)
    randomize_adapter(model, seed=seed, scale=0.2)
    return adapter_from_model(model, base_fingerprint=fp)


def run_to_end(engine: Engine, limit: int = 500) -> dict:
    outputs = {}
    for _ in range(limit):
        outputs.update((o.request_id, o) for o in engine.step())
        if not engine.has_unfinished():
            return outputs
        if not engine.scheduler.running:
            threading.Event().wait(0.002)  # only waiting on a loader thread
    raise AssertionError("the engine did not finish")


# --- every method served beside LoRA (test_serve_methods, test_serve_vera) ---


def written_adapters(
    tokenizer, root: Path, configs: dict[str, Callable], randomize: Callable, seed: int
) -> dict[str, Adapter]:
    """name -> Adapter made from each PEFT config on the seed-0 tiny base, its weights set by
    `randomize(model, seed + i, name)`, written and read back as a server would."""
    out = {}
    for i, (name, make) in enumerate(configs.items()):
        config = make()
        config.task_type = "CAUSAL_LM"
        model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config)
        randomize(model, seed + i, name)
        out[name] = read_adapter(write_adapter(root / name, adapter_from_model(model)))
    return out


def peft_reference(tokenizer, adapter: Adapter | None):
    """The seed-0 tiny base alone (None) or with `adapter` attached through PEFT."""
    model = tiny_llama(0, vocab_size=len(tokenizer))
    return model if adapter is None else attach(model, adapter)


def greedy_matches_peft(engine, tokenizer, adapters, plan, prompt_ids, max_tokens=8) -> set:
    """Run prompt i on adapter plan[i] (None: the base) through `engine`, assert each greedy
    answer equals transformers + PEFT's generate, and return the distinct answers."""
    params = SamplingParams(max_tokens=max_tokens)
    rids = [engine.add_request(p, n, params) for p, n in zip(prompt_ids, plan, strict=True)]
    outputs = run_to_end(engine)
    models = {n: peft_reference(tokenizer, adapters[n] if n else None) for n in set(plan)}
    seen = set()
    for rid, prompt, name in zip(rids, prompt_ids, plan, strict=True):
        x = torch.tensor([prompt])
        ref = models[name].generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert outputs[rid].token_ids == ref[0, x.shape[1] :].tolist(), name
        seen.add(tuple(ref[0, x.shape[1] :].tolist()))
    return seen
