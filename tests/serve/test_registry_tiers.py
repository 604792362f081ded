"""The registry's CPU tier in bytes (budget, eviction by size, pins of adapters in use), its
bounded prefetch that never stalls decoding rows, the tier figures /metrics shows, merged
virtual adapters as a tier under the same slot policy, and one adapter source per engine."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import GREEDY, run_to_end

from lorafleet.adapters import read_adapter
from lorafleet.compose import merge_adapters
from lorafleet.errors import LorafleetError
from lorafleet.serve import AdapterRegistry
from lorafleet.serve.adapter_store import CpuCache, parse_size, tensor_bytes
from lorafleet.serve.api.metrics import Metrics
from lorafleet.serve.merged import MergeRecipe
from lorafleet.serve.sequence import SamplingParams


class FakeAdapter:
    def __init__(self, nbytes: int):
        self.tensors = {"w": torch.zeros(nbytes, dtype=torch.uint8)}


def sizes(disk) -> dict[str, int]:
    return {n: tensor_bytes(read_adapter(disk / n)) for n in ("attn2", "lora4", "rslora8")}


def load(engine, registry, name):
    assert registry.prepare(name) is None and registry.wait(10)
    assert registry.prepare(name) is None and name in engine.loaded_adapters()


def test_parse_size():
    assert parse_size("512MB") == 512 * 2**20 and parse_size("2GB") == 2 * 2**30
    assert parse_size("1.5g") == int(1.5 * 2**30) and parse_size("800k") == 800 * 1024
    assert parse_size("1000") == 1000 and parse_size(" 3 GiB ") == 3 * 2**30
    assert parse_size(0) == 0
    for bad in ("", "lots", "-1GB", "2XB", "1e9"):
        with pytest.raises(LorafleetError, match="as a size"):
            parse_size(bad)


def test_cpu_tier_evicts_by_bytes_across_ranks(make, disk, reads):
    s = sizes(disk)
    assert s["attn2"] < s["lora4"] < s["rslora8"]  # ranks 2 (attention only), 4, 8
    budget = s["rslora8"] + s["attn2"]
    engine, registry = make(max_slots=1, cpu_cache_bytes=f"{budget}B")
    assert registry.stats()["cpu_budget_bytes"] == budget
    load(engine, registry, "lora4")
    load(engine, registry, "attn2")
    assert registry.cpu_adapters() == ["lora4", "attn2"]
    load(engine, registry, "rslora8")  # one eviction (lora4) makes room: exactly the budget
    assert registry.cpu_adapters() == ["attn2", "rslora8"]
    assert registry.stats()["cpu_bytes"] == budget
    # lora4b (rank 4) is bigger than attn2: dropping the one least recently used adapter is
    # not enough, so both go, as a count-based cache of two would never do.
    load(engine, registry, "lora4b")
    assert registry.cpu_adapters() == ["lora4b"]
    stats = registry.stats()
    assert stats["cpu_bytes"] == s["lora4"] and stats["evictions_cpu"] == 3
    assert reads.names() == ["lora4", "attn2", "rslora8", "lora4b"]
    assert stats["cold_loads"] == 4 and 0 < stats["cold_load_p50_s"] <= stats["cold_load_p99_s"]


def test_cpu_cache_never_evicts_a_pinned_entry():
    pins = {"a"}
    cache = CpuCache(100, pinned=pins.__contains__)
    for name in "abc":
        assert cache.put(name, FakeAdapter(40), ()) == ([] if name != "c" else ["b"])
    assert list(cache.entries) == ["a", "c"] and cache.nbytes == 80
    pins.add("c")
    assert cache.put("d", FakeAdapter(70), ()) == []  # a, c pinned: d itself cannot stay
    assert list(cache.entries) == ["a", "c"] and cache.nbytes == 80
    pins.update("cd")
    assert cache.put("d", FakeAdapter(70), ()) == []  # all pinned: over capacity for now
    assert list(cache.entries) == ["a", "c", "d"] and cache.nbytes == 150
    assert cache.shrink() == []
    pins.clear()
    assert cache.shrink() == ["a", "c"] and cache.nbytes == 70
    assert cache.put("e", FakeAdapter(101), ()) == [] and "e" not in cache  # bigger than all


def test_cpu_tier_keeps_an_adapter_a_running_request_uses(make, disk, prompts):
    s = sizes(disk)
    engine, registry = make(max_slots=2, cpu_cache_bytes=2 * s["lora4"])
    rid = engine.add_request(prompts[0], "lora4", SamplingParams(max_tokens=12))
    registry.wait(10)
    engine.step()
    assert engine.adapter_in_use("lora4") == 1
    load(engine, registry, "attn2")
    assert registry.cpu_adapters() == ["lora4", "attn2"]
    # Over budget: lora4 is the least recently used, but in use, so attn2 goes instead.
    load(engine, registry, "lora4b")
    assert registry.cpu_adapters() == ["lora4", "lora4b"]
    assert registry.stats()["cpu_bytes"] == 2 * s["lora4"] and engine.adapter_in_use("lora4")
    outputs = run_to_end(engine)
    assert outputs[rid].finish_reason == "length" and len(outputs[rid].token_ids) == 12
    load(engine, registry, "attn2")  # lora4 is idle now: the least recently used goes
    assert registry.cpu_adapters() == ["lora4b", "attn2"]
    assert registry.stats()["evictions_cpu"] == 2


def test_prefetch_is_bounded_and_decoding_rows_never_wait(make, prompts, expected, reads):
    engine, registry = make(max_slots=4, prefetch=1)
    assert registry.prefetch == 1
    events = []
    fast = engine.add_request(prompts[0], "lora4", GREEDY, on_token=events.append)
    assert registry.wait(10)
    engine.step()
    reads.block = {"rslora8"}  # a slow disk for this one
    slow = engine.add_request(prompts[1], "rslora8", GREEDY)
    later = engine.add_request(prompts[2], "attn2", GREEDY)
    for step in range(4):
        engine.step()
        assert len(events) == step + 2  # the running row gets its token every step
        # One load ahead at most: attn2 is not read until rslora8's read ends.
        assert (registry.state("rslora8"), registry.state("attn2")) == ("loading", "disk")
    reads.gate.set()
    outputs = run_to_end(engine)
    assert outputs[fast].token_ids == expected[("lora4", 0)]
    assert outputs[slow].token_ids == expected[("rslora8", 1)]
    assert outputs[later].token_ids == expected[("attn2", 2)]
    assert reads.names() == ["lora4", "rslora8", "attn2"]


def test_metrics_show_the_tiers(make, disk, prompts):
    engine, registry = make(max_slots=1, cpu_cache_bytes="1MB")
    for name in ("lora4", "attn2", "lora4"):
        load(engine, registry, name)
    stats = registry.stats()
    text = Metrics(engine, registry).render().decode()

    def value(metric):
        line = next(ln for ln in text.splitlines() if ln.startswith(metric + " "))
        return float(line.split()[-1])

    assert value("lorafleet_adapter_cpu_budget_bytes") == 2**20
    assert (
        value("lorafleet_adapter_cpu_bytes")
        == stats["cpu_bytes"]
        == sum(sizes(disk)[n] for n in ("lora4", "attn2"))
    )
    assert value("lorafleet_adapter_cold_load_seconds_count") == 2  # lora4 came back from CPU
    assert value('lorafleet_adapter_cold_load_seconds_bucket{le="+Inf"}') == 2
    assert value("lorafleet_adapter_cache_cpu_hits_total") == 1
    assert value("lorafleet_adapter_cache_misses_total") == 2
    assert value("lorafleet_adapter_cpu_hit_rate") == pytest.approx(1 / 3)
    assert value("lorafleet_adapter_slot_hit_rate") == pytest.approx(stats["slot_hit_rate"])


def ties(density: float) -> MergeRecipe:
    return MergeRecipe((("lora4", 0.6), ("lora4b", 0.4)), "ties", density)


def test_merged_adapters_share_the_slots_by_one_lru(make, prompts):
    engine, registry = make(max_slots=1, merge=merge_adapters)
    load(engine, registry, "lora4")
    name = registry.merged_adapter(ties(0.5))
    assert name.startswith("merged:ties:") and registry.merged_adapter(ties(0.5)) == name
    assert registry.merged.stats()["merges"] == 1 and registry.state(name) is None  # unlisted
    assert registry.prepare(name) is None and engine.loaded_adapters() == {name: 1}
    load(engine, registry, "lora4")  # the merged one is now the least recently used: it goes
    assert name not in engine.loaded_adapters() and registry.stats()["evictions_slot"] == 2
    out = engine.generate([(prompts[0], name, SamplingParams(max_tokens=3))])[0]
    assert out.finish_reason == "length" and engine.loaded_adapters() == {name: 1}


def test_merged_tier_keeps_what_a_request_needs_within_its_bytes(make, prompts):
    engine, registry = make(max_slots=2, merge=merge_adapters, merge_cache_mb=0)
    first = registry.merged_adapter(ties(0.3))
    rid = engine.add_request(prompts[0], first, SamplingParams(max_tokens=4))
    second = registry.merged_adapter(ties(0.4))  # over the budget, but `first` is needed
    assert registry.merged.stats()["adapters"] == 2 and first in engine.loaded_adapters()
    assert run_to_end(engine)[rid].finish_reason == "length"
    third = registry.merged_adapter(ties(0.6))  # both idle now: both go, slots freed too
    stats = registry.merged.stats()
    assert (stats["adapters"], stats["evictions"], stats["merges"]) == (1, 2, 3)
    assert first not in engine.loaded_adapters() and third in registry.merged
    assert second not in registry.merged
    assert registry.prepare(first) == (
        "the merged adapter left the cache before its request ran; send it again"
    )


def test_an_engine_has_one_adapter_source(make):
    engine, registry = make()
    with pytest.raises(LorafleetError, match="already has an adapter source"):
        AdapterRegistry(engine, None)
    registry.close()  # detaches: another registry may take its place
    AdapterRegistry(engine, None).close()
