"""The tiered adapter registry on a tiny Llama: disk -> CPU LRU -> slots, background loads,
eviction that spares adapters in use, bad adapters failing alone, names and paths checked."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from serve_helpers import GREEDY, NAMES, run_to_end

import lorafleet.serve.registry as registry_module
from lorafleet.adapters import read_adapter
from lorafleet.serve.adapter_store import MB, tensor_bytes


def test_serves_adapters_from_disk_like_a_direct_load(make, prompts, expected, reads):
    engine, registry = make()
    assert registry.names() == NAMES
    plan = [("lora4", 0), ("rslora8", 1), ("attn2", 2), ("lora4b", 3), (None, 4), ("lora4", 5)]
    outs = engine.generate([(prompts[i], n, GREEDY) for n, i in plan])
    for out, key in zip(outs, plan, strict=True):
        assert out.finish_reason == "length" and out.token_ids == expected[key], key
    # Not vacuous: every adapter (and the base) gives other tokens on one prompt.
    assert len({tuple(expected[(n, 0)]) for n in [None, *NAMES]}) == 5
    stats = registry.stats()
    assert {k: stats[k] for k in ("misses", "loads", "failures", "evictions_slot")} == {
        "misses": 4,
        "loads": 4,
        "failures": 0,
        "evictions_slot": 0,
    }
    assert (stats["resident"], stats["cpu_adapters"]) == (4, 4) and stats["cpu_mb"] > 0
    assert all(thread != "MainThread" for _, thread in reads)  # read off the caller's thread
    # Resident now: served again without touching the disk; each request (5 name an
    # adapter) and each prepare() call is a hit.
    hits = stats["hits"]
    again = engine.generate([(prompts[i], n, GREEDY) for n, i in plan])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert len(reads) == 4 and registry.stats()["misses"] == 4
    assert registry.stats()["hits"] == hits + 5 and registry.stats()["slot_hit_rate"] > 0.5
    assert registry.prepare("lora4") is None and registry.stats()["hits"] == hits + 6
    assert registry.state("lora4") == "resident" and registry.state("nope") is None


def test_two_slots_serve_four_adapters_and_spare_those_in_use(make, prompts, expected):
    engine, registry = make(max_slots=2, max_batch_size=8)
    unloaded, unload = [], engine.unload_adapter

    def spy(name):
        assert engine.adapter_in_use(name) == 0, f"{name} was evicted while running"
        unloaded.append(name)
        unload(name)

    engine.unload_adapter = spy
    keys = [(NAMES[i % 4], i % len(prompts)) for i in range(8)]
    ids = [engine.add_request(prompts[i], n, GREEDY) for n, i in keys]
    outputs = {}
    for _ in range(500):
        outputs.update((o.request_id, o) for o in engine.step())
        loaded = engine.loaded_adapters()
        assert len(loaded) <= 2
        assert all(s.adapter in loaded for s in engine.scheduler.running)
        if not engine.has_unfinished():
            break
        registry.wait(10)
    for rid, key in zip(ids, keys, strict=True):
        assert outputs[rid].token_ids == expected[key], key
    stats = registry.stats()
    assert stats["evictions_slot"] == len(unloaded) >= 2 and stats["loads"] >= 4
    assert stats["failures"] == 0

    # Both slots pinned by running requests: a third adapter waits, nothing is evicted.
    unloaded.clear()
    busy = [a for a in NAMES if a in engine.loaded_adapters()]
    cold = next(a for a in NAMES if a not in busy)
    first = [engine.add_request(prompts[i], a, GREEDY) for i, a in enumerate(busy)]
    engine.step()
    late = engine.add_request(prompts[2], cold, GREEDY)
    for _ in range(3):
        engine.step()
        registry.wait(10)
        assert unloaded == [] and engine.stats()["waiting"] == 1
    outputs = run_to_end(engine)
    assert outputs[late].token_ids == expected[(cold, 2)]
    assert [outputs[r].token_ids for r in first] == [expected[(a, i)] for i, a in enumerate(busy)]
    assert len(unloaded) == 1

    # Least recently used goes first: touch one resident adapter, load another.
    older, newer = sorted(engine.loaded_adapters(), key=lambda n: n == cold)  # cold is newest
    assert registry.prepare(older) is None  # a hit: now the most recent
    third = next(a for a in NAMES if a not in (older, newer))
    unloaded.clear()
    assert registry.prepare(third) is None and registry.wait(10)
    registry.prepare(third)  # installs it now if the loader found the engine busy
    assert unloaded == [newer] and set(engine.loaded_adapters()) == {older, third}


def test_cold_load_runs_in_the_background(make, prompts, expected, reads):
    engine, registry = make()
    reads.block = {"rslora8"}
    events = []
    fast = engine.add_request(prompts[0], "lora4", GREEDY, on_token=events.append)
    assert registry.wait(10)
    engine.step()  # prefill: lora4 is streaming
    slow = engine.add_request(prompts[1], "rslora8", GREEDY)
    for step in range(5):
        engine.step()
        # The other request keeps producing a token per step while the read is stuck.
        assert len(events) == step + 2 and registry.state("rslora8") == "loading"
        assert engine.stats()["waiting"] == 1
    reads.gate.set()
    outputs = run_to_end(engine)
    assert outputs[fast].token_ids == expected[("lora4", 0)]
    assert outputs[slow].token_ids == expected[("rslora8", 1)]
    assert [thread.startswith("lorafleet-load") for _, thread in reads] == [True, True]


def test_concurrent_prepares_load_once(make, reads):
    engine, registry = make()
    reads.block = {"lora4"}
    barrier = threading.Barrier(8)
    answers = []

    def ask():
        barrier.wait()
        answers.append(registry.prepare("lora4"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert answers == [None] * 8 and registry.state("lora4") == "loading"
    reads.gate.set()
    assert registry.wait(10)
    registry.prepare("lora4")
    assert reads.names() == ["lora4"] and "lora4" in engine.loaded_adapters()
    stats = registry.stats()
    assert (stats["misses"], stats["loads"], stats["hits"]) == (1, 1, 1)


def test_cpu_lru_drops_the_least_recently_used(make, disk, tmp_path, reads):
    for name in "xyz":  # three adapters of one size
        shutil.copytree(disk / "lora4", tmp_path / name)
    size = tensor_bytes(read_adapter(tmp_path / "x"))
    engine, registry = make(tmp_path, max_slots=1, cpu_cache_mb=2.5 * size / MB)

    def load(name):
        assert registry.prepare(name) is None and registry.wait(10)
        assert registry.prepare(name) is None and engine.loaded_adapters() == {name: 1}

    load("x")
    load("y")
    assert registry.cpu_adapters() == ["x", "y"]
    load("x")  # from CPU memory, not disk: x becomes the most recent there too
    assert registry.cpu_adapters() == ["y", "x"]
    load("z")  # past capacity: y, the least recently used, leaves CPU memory
    assert registry.cpu_adapters() == ["x", "z"]
    load("y")  # so y comes from disk again, and x leaves
    assert registry.cpu_adapters() == ["z", "y"]
    assert reads.names() == ["x", "y", "z", "y"]
    stats = registry.stats()
    want = {"misses": 4, "cpu_hits": 1, "evictions_cpu": 2, "evictions_slot": 4, "failures": 0}
    assert {k: stats[k] for k in want} == want
    assert stats["hits"] == 5 and stats["loads"] == 5  # each load() ends with a hit
    assert stats["cpu_mb"] == pytest.approx(2 * size / MB) and stats["cpu_adapters"] == 2


def test_a_stepping_thread_and_client_threads(make, prompts, expected):
    """The engine steps on its own thread (as the server runs it) while clients add requests
    for more adapters than slots: loads, installs and evictions interleave with steps."""
    engine, registry = make(max_slots=2, max_batch_size=4)
    done, outputs, stop = threading.Event(), {}, threading.Event()

    def loop():
        while not stop.is_set():
            outputs.update((o.request_id, o) for o in engine.step())
            if not engine.scheduler.running:
                threading.Event().wait(0.001)  # idle, or only waiting on loads

    stepper = threading.Thread(target=loop)
    stepper.start()
    keys, ids, lock = [], [], threading.Lock()

    def client(k):
        for j in range(3):
            key = (NAMES[(k + j) % 4], (k + 2 * j) % len(prompts))
            rid = engine.add_request(prompts[key[1]], key[0], GREEDY)
            with lock:
                keys.append(key)
                ids.append(rid)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(30)
    for _ in range(3000):
        if all(i in outputs for i in ids):
            done.set()
            break
        threading.Event().wait(0.01)
    stop.set()
    stepper.join(30)
    assert done.is_set(), engine.stats()
    for rid, key in zip(ids, keys, strict=True):
        assert outputs[rid].token_ids == expected[key], key
    assert registry.stats()["failures"] == 0


def test_staging_to_the_slots_format_runs_on_a_loader_thread(
    make, monkeypatch, prompts, expected, reads
):
    """Slots on another device or dtype (a GPU) get a converted copy made off the step thread,
    also for an adapter coming back from CPU memory; the CPU tier keeps the original."""
    real, copies = registry_module.to_slot_format, []

    def convert(adapter, fmt, copy=True):
        if copy:
            copies.append(threading.current_thread().name)
        return real(adapter, fmt, copy)

    monkeypatch.setattr(registry_module, "to_slot_format", convert)
    engine, registry = make(max_slots=1)
    monkeypatch.setattr(engine, "slot_format", lambda: ("cpu", torch.float64))
    for name in ["lora4", "attn2", "lora4"]:
        assert registry.prepare(name) is None and registry.wait(10)
        assert registry.prepare(name) is None and name in engine.loaded_adapters()
    stats = registry.stats()
    assert (stats["misses"], stats["cpu_hits"], stats["loads"]) == (2, 1, 3)
    assert reads.names() == ["lora4", "attn2"]  # the third came from CPU memory
    assert len(copies) == 3 and all(t.startswith("lorafleet-load") for t in copies)
    kept = registry._cpu.get("lora4").adapter.tensors.values()
    assert {t.dtype for t in kept} == {torch.float32}
    out = engine.generate([(prompts[0], "lora4", GREEDY)])[0]
    assert out.token_ids == expected[("lora4", 0)]
