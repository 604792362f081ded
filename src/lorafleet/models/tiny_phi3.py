"""A tiny random Phi-3 (fused qkv_proj and gate_up_proj, partial RoPE) with a small tokenizer."""

from __future__ import annotations

from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from lorafleet.models.tiny_common import (
    TINY_GEOMETRY,
    TokenizerSpec,
    build_tiny,
    tiny_bpe_tokenizer,
)

# Phi-3's chat format: <|ROLE|>\n text <|end|>\n per turn; the reply follows <|assistant|>.
PHI3_TOKENS = TokenizerSpec(
    specials=(
        "<unk>",
        "<s>",
        "<|endoftext|>",
        "<|user|>",
        "<|assistant|>",
        "<|system|>",
        "<|end|>",
    ),
    bos="<s>",
    eos="<|end|>",
    pad="<|endoftext|>",
    unk="<unk>",
    chat_template=(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
)


def tiny_phi3_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """The tiny BPE with Phi-3's specials and chat template (no BOS added)."""
    return tiny_bpe_tokenizer(PHI3_TOKENS, chat_template)


def tiny_phi3(seed: int = 0, tokenizer=None, **overrides) -> Phi3ForCausalLM:
    """A 2-layer, 64-wide Phi-3 (one qkv_proj and one gate_up_proj per layer, untied head,
    RoPE on 3/4 of each head's dims as Phi-4-mini), random norms."""
    settings = {
        "vocab_size": 400,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "original_max_position_embeddings": TINY_GEOMETRY["max_position_embeddings"],
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75},
    }
    return build_tiny(Phi3ForCausalLM, Phi3Config, seed, settings, tokenizer, **overrides)


def tiny_phi3_base(seed: int = 0) -> tuple[Phi3ForCausalLM, PreTrainedTokenizerFast]:
    """The `tiny-phi3` base: `tiny_phi3(seed)` with the tiny Phi-3 tokenizer."""
    tokenizer = tiny_phi3_tokenizer()
    return tiny_phi3(seed, tokenizer), tokenizer
