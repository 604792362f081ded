"""A tiny random Qwen2 / Qwen2.5 (q/k/v biases) with a small ChatML tokenizer, for tests."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from lorafleet.models.tiny_common import TokenizerSpec, build_tiny, tiny_bpe_tokenizer

# Qwen's ChatML: turns between <|im_start|>ROLE and <|im_end|>; no BOS, replies end at <|im_end|>.
QWEN_TOKENS = TokenizerSpec(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
)


def tiny_qwen_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """The tiny BPE with Qwen's specials and ChatML template (shared by Qwen2 and Qwen3)."""
    return tiny_bpe_tokenizer(QWEN_TOKENS, chat_template)


def tiny_qwen2(seed: int = 0, tokenizer=None, **overrides) -> Qwen2ForCausalLM:
    """A 2-layer, 64-wide Qwen2 (biased q/k/v, tied head, no sliding window unless overridden:
    use_sliding_window, sliding_window, max_window_layers), random norms and biases."""
    settings = {"vocab_size": 400, "tie_word_embeddings": True, "pad_token_id": 0}
    return build_tiny(Qwen2ForCausalLM, Qwen2Config, seed, settings, tokenizer, **overrides)


def tiny_qwen2_base(seed: int = 0) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """The `tiny-qwen2` base: `tiny_qwen2(seed)` with the tiny Qwen tokenizer."""
    tokenizer = tiny_qwen_tokenizer()
    return tiny_qwen2(seed, tokenizer), tokenizer
