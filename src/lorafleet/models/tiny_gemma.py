"""A tiny random Gemma 3 with its own small byte-level BPE tokenizer (not SmolLM2's), for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from lorafleet.models.tiny_common import TokenizerSpec, tiny_bpe_tokenizer

# Gemma's chat format: turns between <start_of_turn>ROLE and <end_of_turn>, the reply by "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_TOKENS = TokenizerSpec(
    specials=("<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    add_bos=True,  # like Gemma's own tokenizer
    chat_template=GEMMA_CHAT_TEMPLATE,
)


def tiny_gemma_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A ~400-token byte-level BPE trained in milliseconds (every text encodes); Gemma's specials
    and chat template (or none), BOS added like Gemma's own tokenizer."""
    return tiny_bpe_tokenizer(GEMMA_TOKENS, chat_template)


def tiny_gemma3(seed: int = 0, vocab_size: int = 400, tokenizer=None) -> Gemma3ForCausalLM:
    """A 2-layer, 64-wide Gemma 3 (one sliding, one full layer) with weights from `seed`."""
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k) for k in ids}
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        initializer_range=0.1,
        tie_word_embeddings=True,
        **ids,
    )
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()


def save_tiny_gemma_base(path: str | Path, seed: int = 0, chat_template: bool = True) -> Path:
    """Write a tiny Gemma 3 + its tiny tokenizer as a transformers model directory."""
    path = Path(path)
    tokenizer = tiny_gemma_tokenizer(chat_template)
    model = tiny_gemma3(seed, vocab_size=len(tokenizer), tokenizer=tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_gemma_base(seed: int = 0) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerFast]:
    """The `tiny-gemma` base: `tiny_gemma3(seed)` with its tiny tokenizer."""
    tokenizer = tiny_gemma_tokenizer()
    return tiny_gemma3(seed, vocab_size=len(tokenizer), tokenizer=tokenizer), tokenizer
