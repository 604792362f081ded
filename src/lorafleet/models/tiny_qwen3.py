"""A tiny random Qwen3 (q/k RMS-normed per head) with the small ChatML tokenizer, for tests."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from lorafleet.models.tiny_common import build_tiny
from lorafleet.models.tiny_qwen2 import tiny_qwen_tokenizer


def tiny_qwen3(seed: int = 0, tokenizer=None, **overrides) -> Qwen3ForCausalLM:
    """A 2-layer, 64-wide Qwen3 (q_norm / k_norm over each head's 16 dims, no biases, tied
    head), random norms (q_norm / k_norm included)."""
    settings = {"vocab_size": 400, "head_dim": 16, "tie_word_embeddings": True, "pad_token_id": 0}
    return build_tiny(Qwen3ForCausalLM, Qwen3Config, seed, settings, tokenizer, **overrides)


def tiny_qwen3_base(seed: int = 0) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """The `tiny-qwen3` base: `tiny_qwen3(seed)` with the tiny Qwen tokenizer."""
    tokenizer = tiny_qwen_tokenizer()
    return tiny_qwen3(seed, tokenizer), tokenizer
