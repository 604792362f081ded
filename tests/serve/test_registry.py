"""The tiered adapter registry on a tiny Llama: disk -> CPU LRU -> slots, background loads,
eviction that spares adapters in use, bad adapters failing alone, names and paths checked."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, MissConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from serve_helpers import TARGETS, tiny_base

import lorafleet.serve.registry as registry_module
from lorafleet.adapters import Adapter, adapter_from_model, read_adapter, write_adapter
from lorafleet.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from lorafleet.errors import LorafleetError
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import AdapterRegistry, Engine, SamplingParams
from lorafleet.serve.adapter_store import MB, tensor_bytes

GREEDY = SamplingParams(max_tokens=8)
NAMES = ["attn2", "lora4", "lora4b", "rslora8"]


@pytest.fixture(scope="module")
def base_fp(tokenizer) -> str:
    return fingerprint(tiny_llama(0, vocab_size=len(tokenizer)))


def peft_adapter(tokenizer, config, seed, fp) -> Adapter:
    """A PEFT adapter on the seed-0 tiny base with random non-zero weights."""
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config)
    randomize_adapter(model, seed=seed, scale=0.2)
    return adapter_from_model(model, base_fingerprint=fp)


@pytest.fixture(scope="module")
def disk(tmp_path_factory, tokenizer, adapters, base_fp) -> Path:
    """An adapters dir: the engine tests' three adapters (with our fingerprint) + lora4b."""
    root = tmp_path_factory.mktemp("adapters")
    for name, a in adapters.items():
        write_adapter(root / name, Adapter(a.config, a.tensors, {"base_fingerprint": base_fp}))
    lora4b = peft_adapter(tokenizer, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), 40,
                          base_fp)  # fmt: skip
    write_adapter(root / "lora4b", lora4b)
    return root


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = ["The film was a delight.", "Tell me a joke", "Hi", "Two plus two is",
             "Once upon a time", "Question: what is the capital of France? Answer:"]  # fmt: skip
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def expected(tokenizer, disk, prompts) -> dict:
    """(adapter, prompt index) -> greedy tokens from an engine with the adapters loaded directly."""
    engine = Engine(tiny_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=128,
                    max_batch_size=32)  # fmt: skip
    for name in NAMES:
        engine.load_adapter(name, read_adapter(disk / name))
    keys = [(n, i) for n in [None, *NAMES] for i in range(len(prompts))]
    outs = engine.generate([(prompts[i], n, GREEDY) for n, i in keys])
    return {k: o.token_ids for k, o in zip(keys, outs, strict=True)}


@pytest.fixture
def make(tokenizer, disk):
    """(adapters_dir=disk, **engine and registry options) -> (engine, registry); closed after."""
    made = []

    def build(adapters_dir=disk, *, max_slots=4, max_batch_size=16, **kwargs):
        engine = Engine(tiny_base(tokenizer), max_slots=max_slots, max_rank=8, max_seq_len=128,
                        max_batch_size=max_batch_size)  # fmt: skip
        registry = AdapterRegistry(engine, adapters_dir, **kwargs)
        made.append(registry)
        return engine, registry

    yield build
    for registry in made:
        registry.close()


@pytest.fixture
def reads(monkeypatch):
    """Record (adapter dir name, thread name) per disk read; reads of names in `reads.block`
    wait for `reads.gate` (a slow disk)."""

    class Reads(list):
        gate = threading.Event()
        block: set[str] = set()

        def names(self):
            return [name for name, _ in self]

    log = Reads()
    real = registry_module.read_adapter

    def read(path):
        log.append((Path(path).name, threading.current_thread().name))
        if Path(path).name in log.block:
            assert log.gate.wait(30), "the test never opened the gate"
        return real(path)

    monkeypatch.setattr(registry_module, "read_adapter", read)
    yield log
    log.gate.set()  # never leave a loader thread blocked


def run_to_end(engine: Engine, limit: int = 500) -> dict:
    outputs = {}
    for _ in range(limit):
        outputs.update((o.request_id, o) for o in engine.step())
        if not engine.has_unfinished():
            return outputs
        if not engine.scheduler.running:
            threading.Event().wait(0.002)  # only waiting on a loader thread
    raise AssertionError("the engine did not finish")


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
        "misses": 4, "loads": 4, "failures": 0, "evictions_slot": 0}  # fmt: skip
    assert (stats["resident"], stats["cpu_adapters"]) == (4, 4) and stats["cpu_mb"] > 0
    assert all(thread != "MainThread" for _, thread in reads)  # read off the caller's thread
    # Resident now: served again without touching the disk; a prepare() call is a hit.
    again = engine.generate([(prompts[i], n, GREEDY) for n, i in plan])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert len(reads) == 4 and registry.stats()["misses"] == 4
    assert registry.prepare("lora4") is None and registry.stats()["hits"] == 1
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


def write_nan(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    file = dst / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata=header)


@pytest.fixture
def bad_dir(tmp_path, tokenizer, disk, base_fp) -> Path:
    """lora4 plus one broken adapter per problem (directory name -> expected message part)."""
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(disk / "lora4", root / "lora4")
    shutil.copytree(disk / "lora4", root / "badjson")
    (root / "badjson" / CONFIG_NAME).write_text("{not json")
    write_nan(disk / "lora4", root / "nan")
    good = read_adapter(disk / "lora4")
    other_fp = fingerprint(tiny_llama(1, vocab_size=len(tokenizer)))
    write_adapter(root / "otherbase", Adapter(good.config, good.tensors,
                                              {"base_fingerprint": other_fp}))  # fmt: skip
    shapes = dict(good.tensors)
    key = sorted(k for k in shapes if "lora_A" in k)[0]
    shapes[key] = torch.zeros(4, 65)
    write_adapter(root / "badshape", Adapter(good.config, shapes, dict(good.meta)))
    configs = {
        "bigrank": LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"]),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
        "bone": MissConfig(r=4, target_modules=["q_proj"]),
    }
    for i, (name, config) in enumerate(configs.items()):
        write_adapter(root / name, peft_adapter(tokenizer, config, 50 + i, base_fp))
    return root


BAD = {
    "badjson": "invalid JSON",
    "nan": "non-finite",
    "otherbase": "trained on another base",
    "badshape": "has shape (4, 65)",
    "bigrank": "rank 16",
    "dora": "DoRA",
    "bone": "MISS",
}


def test_bad_adapters_fail_only_their_requests(make, bad_dir, prompts, expected, reads):
    engine, registry = make(bad_dir)
    plan = [("lora4", 0), (None, 1)] + [(n, i % 6) for n in BAD for i in range(2)]
    outs = engine.generate([(prompts[i], n, GREEDY) for n, i in plan])
    for out, (name, i) in zip(outs, plan, strict=True):
        if name in BAD:
            assert out.finish_reason == "error" and out.token_ids == []
            assert f"adapter {name!r} cannot be served" in out.error
            assert BAD[name] in out.error, out.error
            assert "\n" not in out.error and str(bad_dir) not in out.error  # relative paths
        else:
            assert out.finish_reason == "length" and out.token_ids == expected[(name, i)]
    # Two requests each, one read each; a later request fails at once, without a read.
    assert sorted(reads.names()) == sorted(["lora4", *BAD])
    late = engine.generate([(prompts[0], "nan", GREEDY)])[0]
    assert BAD["nan"] in late.error and len(reads) == len(BAD) + 1
    assert registry.state("nan") == "failed" and registry.stats()["failures"] == len(BAD)
    # Fixing the files clears the failure at once (no waiting for it to expire).
    shutil.copy(bad_dir / "lora4" / CONFIG_NAME, bad_dir / "badjson" / CONFIG_NAME)
    fixed = engine.generate([(prompts[3], "badjson", GREEDY)])[0]
    assert fixed.finish_reason == "length" and fixed.token_ids == expected[("lora4", 3)]


def test_names_and_paths_are_checked(make, disk, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(disk / "lora4", root / "group" / "tenant1")
    shutil.copytree(disk / "lora4b", root / "group" / "tenant2")
    shutil.copytree(disk / "attn2", tmp_path / "outside")
    (root / "link").symlink_to(tmp_path / "outside")
    engine, registry = make(root)
    assert registry.names() == ["link"]  # group/ holds no adapter_config.json itself
    for name in ["../x", "", "a/b", "x" * 65, "..", ".", "a b", None, "é"]:
        with pytest.raises(LorafleetError, match="invalid adapter name"):
            registry.add(name, "group/tenant1")
    for path in [tmp_path / "outside", "../outside", root / "group" / ".." / ".." / "outside",
                 "link"]:  # fmt: skip
        with pytest.raises(LorafleetError, match="outside the adapters directory"):
            registry.add("out", path)
    with pytest.raises(LorafleetError, match="not an adapter directory"):
        registry.add("group", "group")
    registry.add("tenant1", "group/tenant1")
    registry.add("tenant1", root / "group" / "tenant1")  # the same again: fine
    assert registry.names() == ["link", "tenant1"]  # a symlink placed in the dir by its owner
    with pytest.raises(LorafleetError, match="already registered"):
        registry.add("tenant1", "group/tenant2")
    assert "invalid adapter name" in registry.prepare("../etc")
    assert registry.prepare("nope") == "unknown adapter 'nope'"
    out = engine.generate([([1, 2, 3], "../../etc/passwd", GREEDY), ([1, 2, 3], "tenant1", GREEDY)])
    assert "invalid adapter name" in out[0].error and out[1].finish_reason == "length"
    # Without an adapters dir, add() takes any adapter directory (the operator's choice).
    _, free = make(None)
    free.add("anywhere", tmp_path / "outside")
    assert free.names() == ["anywhere"]


def test_remove_is_refused_while_in_use(make, prompts, expected):
    engine, registry = make(max_batch_size=1)
    first = engine.add_request(prompts[0], "lora4", GREEDY)
    second = engine.add_request(prompts[1], "lora4", GREEDY)
    registry.wait(10)
    engine.step()
    with pytest.raises(LorafleetError, match="in use by 2 request"):  # one running, one waiting
        registry.remove("lora4")
    outputs = run_to_end(engine)
    assert outputs[first].token_ids == expected[("lora4", 0)]
    assert outputs[second].token_ids == expected[("lora4", 1)]
    registry.remove("lora4")
    assert "lora4" not in engine.loaded_adapters() and "lora4" not in registry.names()
    assert registry.prepare("lora4") == "unknown adapter 'lora4'"
    with pytest.raises(LorafleetError, match="unknown adapter"):
        registry.remove("lora4")
    registry.add("lora4", "lora4")  # back, from the same directory
    out = engine.generate([(prompts[2], "lora4", GREEDY)])[0]
    assert out.token_ids == expected[("lora4", 2)]


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


def test_staging_to_the_slots_format_runs_on_a_loader_thread(make, monkeypatch, prompts,
                                                              expected, reads):  # fmt: skip
    """Slots on another device or dtype (a GPU) get a converted copy made off the step thread,
    also for an adapter coming back from CPU memory; the CPU tier keeps the original."""
    real, copies = registry_module.to_slot_format, []

    def convert(adapter, fmt, copy=True):
        if copy:
            copies.append(threading.current_thread().name)
        return real(adapter, fmt, copy)

    monkeypatch.setattr(registry_module, "to_slot_format", convert)
    monkeypatch.setattr(registry_module, "slot_format", lambda handle: ("cpu", torch.float64))
    engine, registry = make(max_slots=1)
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
