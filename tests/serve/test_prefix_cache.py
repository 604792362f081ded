"""Adapter-aware prefix caching: the block store's keys and LRU, and an engine with the cache
giving the same greedy tokens and logprobs as one without it (several adapters, a partly shared
prefix, a prefix under another adapter that must not hit, a mixture, a re-uploaded adapter, a
sliding-window family, a preempted sequence, prompt_logprobs)."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import tiny_base

from lorafleet.errors import LorafleetError
from lorafleet.models import Base, fingerprint
from lorafleet.models.tiny_mistral import tiny_mistral, tiny_mistral_tokenizer
from lorafleet.serve import Engine, SamplingParams, Sequence
from lorafleet.serve.kv_cache import KVCache
from lorafleet.serve.prefix_cache import BLOCK_TOKENS, PrefixCache, adapter_digest

B = BLOCK_TOKENS
PARAMS = SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True)


def ids(seed: int, n: int, low: int = 3, high: int = 30000) -> list[int]:
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- the block store alone -----------------------------------------------------------------


def cache_with(blocks: int) -> PrefixCache:
    kv = KVCache(2, 4, 1, 64, 2, torch.float32, "cpu")  # 2 layers, 4 slots, 64 positions
    return PrefixCache(kv, blocks * 2 * 2 * 1 * B * 2 * 4)


def placed(cache: PrefixCache, tokens: list[int], slot: int, adapter=None) -> Sequence:
    """A sequence in `slot` whose K/V there are a function of its tokens (for checks)."""
    seq = Sequence(slot, tokens, adapter, SamplingParams())
    seq.kv_slot = slot
    values = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None]  # [1, 1, n, 1]
    cache.kv.k[:, slot, :, : len(tokens)] = values
    cache.kv.v[:, slot, :, : len(tokens)] = -values
    return seq


def test_blocks_are_found_by_owner_and_whole_prefix_and_copied_into_the_slot():
    cache = cache_with(8)
    prompt = ids(0, 2 * B + 5)
    assert cache.store(placed(cache, prompt, 0)) == 2  # two full blocks; the tail is not kept
    assert cache.bytes == 2 * cache.block_bytes
    again = Sequence(9, prompt[: 2 * B] + [7], None, SamplingParams())
    assert cache.cached_tokens(again) == 2 * B
    again.kv_slot = 3
    assert cache.attach(again) == 2 * B == again.prefix_hit
    expected = torch.tensor(prompt[: 2 * B], dtype=torch.float32)
    torch.testing.assert_close(cache.kv.k[1, 3, 0, : 2 * B, 0], expected)
    torch.testing.assert_close(cache.kv.v[0, 3, 0, : 2 * B, 1], -expected)
    # At least one token is prefilled: a prompt of exactly two blocks reuses one.
    exact = Sequence(10, prompt[: 2 * B], None, SamplingParams())
    assert cache.cached_tokens(exact) == B
    # The same second block after another first block is another prefix: not found.
    other = Sequence(11, ids(1, B) + prompt[B : 2 * B] + [1], None, SamplingParams())
    assert cache.cached_tokens(other) == 0
    # Another owner never matches; an unknown adapter and a gated mixture bypass the cache.
    cache.set_identity("a", "digest-1")
    assert cache.cached_tokens(Sequence(12, prompt, "a", SamplingParams())) == 0
    assert cache.owner(Sequence(13, prompt, "unknown", SamplingParams())) is None
    assert cache.store(placed(cache, prompt, 1, "a")) == 2
    assert cache.cached_tokens(Sequence(14, prompt, "a", SamplingParams())) == 2 * B
    cache.set_identity("a", "digest-2")  # re-uploaded under the same name
    assert cache.cached_tokens(Sequence(15, prompt, "a", SamplingParams())) == 0
    asks = Sequence(16, prompt, None, SamplingParams(prompt_logprobs=1))
    assert cache.cached_tokens(asks) == 0  # it prefills every row (but its blocks are stored)
    stats = cache.stats()
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_hit_tokens"] == 2 * B


def test_least_recently_used_blocks_leave_first_within_the_budget():
    cache = cache_with(3)
    shared = ids(2, B)
    first, second = shared + ids(3, B) + [1], shared + ids(4, B) + [1]
    cache.store(placed(cache, first, 0))  # root + tail 1
    cache.store(placed(cache, second, 1))  # tail 2 (the root is shared)
    assert cache.stats()["prefix_cache_blocks"] == 3
    # A third tail evicts the least recently used block: tail 1, never the shared root.
    third = shared + ids(5, B) + [1]
    cache.store(placed(cache, third, 2))
    assert cache.bytes <= cache.budget_bytes
    count = cache.cached_tokens
    assert count(Sequence(1, first, None, SamplingParams())) == B  # its tail left
    assert count(Sequence(2, second, None, SamplingParams())) == 2 * B
    assert count(Sequence(3, third, None, SamplingParams())) == 2 * B
    # A new root evicts the oldest leaf again; a chain longer than the budget stores what fits.
    cache.store(placed(cache, ids(6, 4 * B - 1), 3))
    assert cache.bytes <= cache.budget_bytes and cache.stats()["prefix_cache_evictions"] >= 2
    off = cache_with(0)
    assert not off.enabled and off.store(placed(off, first, 0)) == 0
    with pytest.raises(LorafleetError, match="prefix_cache_bytes"):
        PrefixCache(cache.kv, -1)


def test_adapter_digest_follows_content_not_name(adapters):
    assert adapter_digest(adapters["lora4"]) == adapter_digest(adapters["lora4"])
    assert adapter_digest(adapters["lora4"]) != adapter_digest(adapters["rslora8"])


# -- the engine: cached runs equal uncached runs ----------------------------------------------


def run_phases(engine: Engine, phases: list[list[tuple]]) -> list:
    """Each phase's requests added together and run to the end before the next phase."""
    outputs = []
    for phase in phases:
        outputs += engine.generate(phase)
    return outputs


def assert_same(cached: list, uncached: list) -> None:
    for a, b in zip(cached, uncached, strict=True):
        assert a.error is None and b.error is None
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for x, y in zip(a.prompt_logprobs or [], b.prompt_logprobs or [], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4


def test_cached_prefixes_give_the_uncached_tokens_and_never_cross_adapters(make_engine):
    prefix = ids(10, 2 * B + 8)  # two full blocks and a half
    asks = SamplingParams(max_tokens=4, logprobs=1, prompt_logprobs=2, ignore_eos=True)
    mix = [("lora4", 0.5), ("rslora8", 0.5)]
    phases = [
        [(prefix + ids(11, 5), "lora4", PARAMS), (prefix + ids(12, 3), None, PARAMS)],
        [
            (prefix + ids(13, 4), "lora4", PARAMS),  # hits 2 blocks
            (prefix[:20] + ids(14, 9), "lora4", PARAMS),  # shares only the first block
            (prefix[: 2 * B], "lora4", PARAMS),  # two blocks exactly: one reused
            (prefix + ids(15, 2), "rslora8", PARAMS),  # same tokens, other adapter: no hit
            (prefix + ids(16, 6), None, PARAMS),  # the base: hits 2 blocks
            (prefix + ids(17, 3), "attn2", asks),  # prompt_logprobs: prefilled whole
            (prefix + ids(18, 3), mix, PARAMS),  # a mixture: no hit yet ...
        ],
        [(prefix + ids(19, 3), mix, PARAMS)],  # ... and now one, under the same spec
        [(prefix + ids(20, 3), [("lora4", 0.3), ("rslora8", 0.7)], PARAMS)],  # another spec
    ]
    cached = make_engine()
    uncached = make_engine(prefix_cache_bytes=0)
    assert_same(run_phases(cached, phases), run_phases(uncached, phases))
    stats = cached.stats()
    assert stats["prefix_cache_hit_tokens"] == 2 * B + B + B + 2 * B + 2 * B
    assert stats["prefix_cache_hits"] == 5
    assert stats["prefix_cache_misses"] == 2 + 2 + 1  # phase 1; rslora8 and the mixture; spec
    assert 0 < stats["prefix_cache_bytes"] <= stats["prefix_cache_budget_bytes"]
    assert uncached.stats()["prefix_cache_hits"] == 0 == uncached.stats()["prefix_cache_bytes"]


def test_a_reuploaded_adapter_never_reuses_its_old_kv(make_engine, adapters):
    prompt = ids(30, 2 * B + 3)
    engine = make_engine(load=())
    engine.load_adapter("x", adapters["lora4"])
    first = engine.generate([(prompt, "x", PARAMS)])
    engine.load_adapter("x", adapters["rslora8"])  # same name, other content
    second = engine.generate([(prompt, "x", PARAMS)])
    assert engine.stats()["prefix_cache_hits"] == 0
    reference = make_engine(load=(), prefix_cache_bytes=0)
    reference.load_adapter("x", adapters["rslora8"])
    assert_same(second, reference.generate([(prompt, "x", PARAMS)]))
    engine.load_adapter("x", adapters["lora4"])  # the first content again: its blocks hit
    assert_same(engine.generate([(prompt, "x", PARAMS)]), first)
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * B


def test_only_uncached_rows_count_against_the_token_budget(make_engine):
    prefix = ids(40, 3 * B)
    requests = [(prefix + ids(41 + i, 4), "lora4", PARAMS) for i in range(2)]
    for budget_bytes, admitted in ((None, 2), (0, 1)):
        kwargs = {} if budget_bytes is None else {"prefix_cache_bytes": budget_bytes}
        engine = make_engine(max_batch_tokens=60, **kwargs)
        engine.generate([(prefix + [5], "lora4", PARAMS)])
        for request in requests:
            engine.add_request(*request)
        engine.step()  # 2 x 52 tokens, or 2 x 4 uncached rows, against 60
        assert len(engine.scheduler.running) == admitted


def test_sliding_window_family_equal_with_a_cached_prefix():
    """Mistral with a 6-token window on every layer: prefixes of 2 blocks slide past it."""
    tokenizer = tiny_mistral_tokenizer()

    def engine(**kwargs) -> Engine:
        model = tiny_mistral(0, tokenizer, sliding_window=6)
        base = Base("tiny-mistral", model, tokenizer, fingerprint(model), None, False, 0.0)
        return Engine(base, max_slots=0, max_seq_len=96, **kwargs)

    prefix = ids(50, 2 * B + 4, high=400)
    phases = [[(prefix + ids(51, 3, high=400), None, PARAMS)]]
    phases.append([(prefix + ids(52 + i, 2 + i, high=400), None, PARAMS) for i in range(3)])
    cached = engine()
    assert_same(run_phases(cached, phases), run_phases(engine(prefix_cache_bytes=0), phases))
    assert cached.stats()["prefix_cache_hit_tokens"] == 3 * 2 * B


def test_a_preempted_sequence_resumes_from_its_cached_prompt(tokenizer):
    """As test_fair_share's preemption test, with prompts of two blocks: the resumed request
    reuses its prompt's blocks and still yields the tokens it yields alone."""
    greedy = SamplingParams(max_tokens=10, logprobs=0, ignore_eos=True)
    prompts = [ids(60 + i, 2 * B + 2 + i) for i in range(3)]
    alone = Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=96, prefix_cache_bytes=0)
    expected = alone.generate([(p, None, greedy) for p in prompts])
    engine = Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=96, max_batch_size=2)
    a = [engine.add_request(p, None, greedy, tenant="A") for p in prompts[:2]]
    for _ in range(3):
        engine.step()
    b = engine.add_request(prompts[2], None, greedy, tenant="B")
    engine.step()
    assert engine.scheduler.preemptions == 1
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step())
    assert_same([outputs[r] for r in [*a, b]], expected)
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * B  # the resumed one's prompt
