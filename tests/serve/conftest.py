"""Fixtures for the engine tests: three random PEFT adapters, a fresh engine, HF references."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from serve_helpers import PROMPTS, TARGETS, tiny_base

from lorafleet.adapters import adapter_from_model, attach
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine


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
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            cache[key] = out[0, x.shape[1] :].tolist()
        return cache[key]

    return run


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]
