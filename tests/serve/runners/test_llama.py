"""The engine's own forward against transformers' logits: packed prefill, mixed steps, KV reads."""

from __future__ import annotations

import torch
from serve_helpers import RunnerCheck, tiny_base

from lorafleet.adapters import attach
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine, KVCache, SamplingParams


@torch.no_grad()
def test_runner_logits_match_transformers(tokenizer, adapters, prompt_ids):
    engine = Engine(tiny_base(tokenizer), max_slots=3, max_rank=8, max_batch_size=3)
    assert engine.runner.fused  # q/k/v and gate/up each one base GEMM (layers/fused.py)
    for name in ("lora4", "rslora8"):
        engine.load_adapter(name, adapters[name])
    refs = {None: tiny_llama(0, vocab_size=len(tokenizer))}
    for name in ("lora4", "rslora8"):
        refs[name] = attach(tiny_llama(0, vocab_size=len(tokenizer)), adapters[name])

    run = RunnerCheck(engine, refs, prompt_ids)
    seq, check = run.seq, run.check

    a, b = seq(0, "lora4", kv_slot=2), seq(1, None, kv_slot=0)
    check([a, b], [])  # two prompts of different lengths packed in one forward
    c = seq(4, "rslora8", kv_slot=1)
    check([c], [a, b])  # a prefill and two decodes (KV slots 2, 0: gathered) in one step
    check([], [b, c, a])  # KV slots 0, 1, 2: read as a view of the cache
    check([], [a, c])


def test_fused_and_unfused_projections_give_the_same_greedy_tokens(tokenizer, adapters, prompt_ids):
    outputs = {}
    for fuse in (True, False):
        engine = Engine(tiny_base(tokenizer), max_slots=3, max_rank=8, max_batch_size=4, fuse=fuse)
        assert engine.runner.fused == fuse
        for name in ("lora4", "rslora8"):
            engine.load_adapter(name, adapters[name])
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        requests = [
            (prompt_ids[i], name, params)
            for i, name in enumerate(("lora4", None, "rslora8", "lora4"))
        ]
        outputs[fuse] = [out.token_ids for out in engine.generate(requests)]
    assert outputs[True] == outputs[False]


def test_kv_cache_slots():
    kv = KVCache(2, 3, 1, 8, 4, torch.float32, "cpu")
    assert kv.bytes == 2 * 2 * 3 * 1 * 8 * 4 * 4
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2]
    assert kv.free_slots == 0 and kv.used_slots == 3
    kv.free(1)
    kv.free(0)
    assert kv.allocate() == 0  # lowest first
    assert (kv.free_slots, kv.used_slots) == (1, 2)
    for bad in (lambda: kv.free(1), lambda: (kv.allocate(), kv.allocate())):
        try:
            bad()
        except Exception as exc:
            assert "KV slot" in str(exc)
        else:
            raise AssertionError("expected an error")


def test_filter_logits_top_k_top_p():
    from lorafleet.serve.sampler import filter_logits

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.9], [1.0, 2.0, 3.0, 4.0]])
    x = filter_logits(
        logits,
        temperature=torch.tensor([1.0, 1.0, 0.5]),
        top_k=torch.tensor([2, 0, 0]),
        top_p=torch.tensor([1.0, 0.5, 1.0]),
    )
    assert torch.isinf(x[0]).tolist() == [True, False, False, True]  # top-2
    assert torch.isinf(x[1]).tolist() == [True, True, False, True]  # 5.0 alone holds > 0.5
    torch.testing.assert_close(x[2], logits[2] / 0.5)  # temperature only
