"""End to end on the real embedded models (de-quantised from GGUF, then cached)."""

from __future__ import annotations

import torch
from helpers import logits

from lorafleet.adapters import MethodConfig, new_adapter
from lorafleet.models import load_base
from lorafleet.models.generation import generate_text, prompt_ids
from lorafleet.models.sources import embedded_gguf_path, resolve_base
from lorafleet.paths import cache_dir

PROMPT = "What is the capital of France?"


def test_default_model_converts_once_then_loads_from_cache():
    first = load_base("default")
    second = load_base("default")
    assert second.from_cache
    assert first.fingerprint == second.fingerprint
    assert second.model.config.model_type == "llama"
    assert second.model.config.num_hidden_layers == 30
    assert any((cache_dir() / "models").glob("default-*/model.safetensors"))


def test_default_model_answers_a_fixed_prompt_greedily():
    base = load_base("default")
    reply = generate_text(base.model, base.tokenizer, PROMPT, max_tokens=16)
    assert "Paris" in reply
    # Greedy is deterministic.
    assert generate_text(base.model, base.tokenizer, PROMPT, max_tokens=16) == reply


def test_zero_initialised_adapters_leave_logits_unchanged():
    base = load_base("default")
    ids = torch.tensor([prompt_ids(base.tokenizer, PROMPT)])
    expected = logits(base.model, ids)
    for method in ("lora", "bone"):
        model = new_adapter(load_base("default").model, MethodConfig(method=method))
        assert torch.equal(logits(model, ids), expected), method


def test_cli_generate_on_default(run_cli):
    code, out, err = run_cli(
        "generate", "--base", "default", "--prompt", PROMPT, "--max-tokens", "12"
    )
    assert code == 0, err
    assert "Paris" in out


def test_a_gguf_file_path_loads_like_the_embedded_model():
    gguf = embedded_gguf_path(resolve_base("default").embedded, cache_dir() / "gguf")
    from_file = load_base(str(gguf))
    assert from_file.source.kind == "gguf"
    assert from_file.fingerprint == load_base("default").fingerprint


def test_gemma_270m_loads_and_generates():
    base = load_base("gemma-270m")
    assert base.model.config.model_type.startswith("gemma3")
    reply = generate_text(base.model, base.tokenizer, "The capital of France is", max_tokens=6)
    assert reply.strip()
    assert load_base("gemma-270m").from_cache
