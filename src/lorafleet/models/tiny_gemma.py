"""A tiny random Gemma 3 with its own small byte-level BPE tokenizer (not SmolLM2's), for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

# Gemma's chat format: turns between <start_of_turn>ROLE and <end_of_turn>, the reply by "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_CORPUS = (
    "the film was a delight from start to finish . a dull , lifeless and boring movie . "
    "how is [Anna] related to [Bob] ? her brother , his mother , their aunt and uncle . "
    "question : answer : review : sentiment positive negative yes no son daughter father "
    "Example 1 : 2 3 4 5 6 7 8 9 0 # #### - , . ! ? ' \" the of and to in is it that this was "
)


def tiny_gemma_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A ~400-token byte-level BPE trained in milliseconds (every text encodes); Gemma's specials
    and chat template (or none), BOS added like Gemma's own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if chat_template:
        fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


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
