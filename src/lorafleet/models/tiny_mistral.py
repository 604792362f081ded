"""A tiny random Mistral (sliding-window attention on every layer) with a small tokenizer."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from lorafleet.models.tiny_common import TokenizerSpec, build_tiny, tiny_bpe_tokenizer

# Mistral's instruct format: BOS, then [INST] user [/INST] answer</s> per turn.
MISTRAL_TOKENS = TokenizerSpec(
    specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
    bos="<s>",
    eos="</s>",
    pad="<unk>",
    unk="<unk>",
    add_bos=True,
    chat_template=(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ m['content'] }}{{ eos_token }}{% else %}[INST] {{ m['content'] }} [/INST]"
        "{% endif %}{% endfor %}"
    ),
)
WINDOW = 64  # the tiny base's sliding window: shorter than the benchmark's prompts


def tiny_mistral_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """The tiny BPE with Mistral's specials and [INST] template, BOS added."""
    return tiny_bpe_tokenizer(MISTRAL_TOKENS, chat_template)


def tiny_mistral(seed: int = 0, tokenizer=None, **overrides) -> MistralForCausalLM:
    """A 2-layer, 64-wide Mistral (no biases, untied head, sliding window WINDOW on every
    layer), random norms."""
    settings = {"vocab_size": 400, "head_dim": 16, "sliding_window": WINDOW, "pad_token_id": 0}
    return build_tiny(MistralForCausalLM, MistralConfig, seed, settings, tokenizer, **overrides)


def tiny_mistral_base(seed: int = 0) -> tuple[MistralForCausalLM, PreTrainedTokenizerFast]:
    """The `tiny-mistral` base: `tiny_mistral(seed)` with the tiny Mistral tokenizer."""
    tokenizer = tiny_mistral_tokenizer()
    return tiny_mistral(seed, tokenizer), tokenizer
