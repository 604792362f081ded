"""Fixtures for the engine tests: three random PEFT adapters, a fresh engine, HF references."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from serve_helpers import GREEDY, NAMES, PROMPTS, TARGETS, peft_adapter, tiny_base

import lorafleet.serve.registry as registry_module
from lorafleet.adapters import Adapter, adapter_from_model, attach, read_adapter, write_adapter
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import AdapterRegistry, Engine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while these tests run: the tiny model's forward is many small ops,
    and on a busy 2-core machine two OpenMP threads wait on each other at every op (measured:
    ~10x slower). Restored afterwards, so other tests keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def adapters(tokenizer) -> dict:
    """name -> Adapter: lora r=4 (all linears), rslora r=8, lora r=2 on attention with patterns."""
    configs = {
        "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "rslora8": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS),
        "attn2": LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 6},
            alpha_pattern={"v_proj": 3},
        ),
    }
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        config.task_type = "CAUSAL_LM"
        peft_model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config)
        randomize_adapter(peft_model, seed=20 + i, scale=0.2)
        out[name] = adapter_from_model(peft_model)
    return out


@pytest.fixture
def make_engine(tokenizer, adapters):
    """Build an engine on a fresh tiny base with the given adapters loaded (all by default)."""

    def make(load=tuple(adapters), **kwargs) -> Engine:
        kwargs = {"max_slots": 4, "max_rank": 8, "max_seq_len": 128, **kwargs}
        engine = Engine(tiny_base(tokenizer), **kwargs)
        for name in load:
            engine.load_adapter(name, adapters[name])
        return engine

    return make


@pytest.fixture(scope="session")
def reference(tokenizer, adapters):
    """(adapter or None, prompt ids, max new tokens) -> transformers' greedy generate through
    PEFT with that single adapter, new tokens only (ends at EOS if it stops there)."""
    models, cache = {}, {}

    @torch.no_grad()
    def run(adapter, ids, max_tokens=12) -> list[int]:
        key = (adapter, tuple(ids), max_tokens)
        if key not in cache:
            if adapter not in models:
                model = tiny_llama(0, vocab_size=len(tokenizer))
                models[adapter] = model if adapter is None else attach(model, adapters[adapter])
            x = torch.tensor([list(ids)])
            out = models[adapter].generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            cache[key] = out[0, x.shape[1] :].tolist()
        return cache[key]

    return run


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


# --- the tiered registry: adapters on disk and an engine factory ---


@pytest.fixture(scope="module")
def base_fp(tokenizer) -> str:
    return fingerprint(tiny_llama(0, vocab_size=len(tokenizer)))


@pytest.fixture(scope="module")
def disk(tmp_path_factory, tokenizer, adapters, base_fp) -> Path:
    """An adapters dir: the engine tests' three adapters (with our fingerprint) + lora4b."""
    root = tmp_path_factory.mktemp("adapters")
    for name, a in adapters.items():
        write_adapter(root / name, Adapter(a.config, a.tensors, {"base_fingerprint": base_fp}))
    lora4b = peft_adapter(
        tokenizer, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), 40, base_fp
    )
    write_adapter(root / "lora4b", lora4b)
    return root


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = [
        "The film was a delight.",
        "Tell me a joke",
        "Hi",
        "Two plus two is",
        "Once upon a time",
        "Question: what is the capital of France? Answer:",
    ]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def expected(tokenizer, disk, prompts) -> dict:
    """(adapter, prompt index) -> greedy tokens from an engine with the adapters loaded directly."""
    engine = Engine(
        tiny_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=128, max_batch_size=32
    )
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
        engine = Engine(
            tiny_base(tokenizer),
            max_slots=max_slots,
            max_rank=8,
            max_seq_len=128,
            max_batch_size=max_batch_size,
        )
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
