"""What the tiny random models share: a small byte-level BPE tokenizer trained in milliseconds
with a family's specials and chat template (every family's but Llama's, which has SmolLM2's), the
common small geometry, and random norm weights and biases."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

# Every tiny model's geometry unless a test overrides it: 2 layers, 64 wide, GQA (4 query heads
# over 2 KV heads of 16). The wide init (0.1, not 0.02) lets a frozen tied head's logits move
# enough for an adapter to learn visibly (see models/tiny.py).
TINY_GEOMETRY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "initializer_range": 0.1,
}

_CORPUS = (
    "the film was a delight from start to finish . a dull , lifeless and boring movie . "
    "how is [Anna] related to [Bob] ? her brother , his mother , their aunt and uncle . "
    "question : answer : review : sentiment positive negative yes no son daughter father "
    "Example 1 : 2 3 4 5 6 7 8 9 0 # #### - , . ! ? ' \" the of and to in is it that this was "
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A family's special tokens and chat template for `tiny_bpe_tokenizer`.

    `specials` get the first ids, in order (every named token below must be among them);
    `bos` is prepended to every encoding when `add_bos`; `extra` are the specials that are
    neither bos, eos, pad nor unk (turn markers), kept whole by the tokenizer."""

    specials: tuple[str, ...]
    eos: str
    pad: str
    chat_template: str
    bos: str | None = None
    unk: str | None = None
    add_bos: bool = False

    @property
    def extra(self) -> list[str]:
        named = {self.bos, self.eos, self.pad, self.unk}
        return [token for token in self.specials if token not in named]


def tiny_bpe_tokenizer(
    spec: TokenizerSpec, chat_template: bool = True, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A ~`vocab_size`-token byte-level BPE (every text encodes) trained on a fixed small
    corpus (same spec, same tokenizer), with `spec`'s specials and chat template (or none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    if spec.add_bos and spec.bos is not None:
        bos = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos)]
        )
    named = {"bos_token": spec.bos, "unk_token": spec.unk}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=spec.extra,
        **{key: value for key, value in named.items() if value is not None},
    )
    if chat_template:
        fast.chat_template = spec.chat_template
    return fast


@torch.no_grad()
def randomize_norms_and_biases(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Draw every norm weight as 1 + scale * N(0, 1) and every linear bias as scale * N(0, 1)
    (from `seed`): transformers starts them at exactly 1 and 0, which would hide a runner that
    skips a norm or a bias. Returns `model`."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1 + scale * torch.randn(param.shape, generator=gen))
        elif name.endswith("bias"):
            param.copy_(scale * torch.randn(param.shape, generator=gen))
    return model


def build_tiny(model_cls, config_cls, seed: int, settings: dict, tokenizer=None, **overrides):
    """A tiny `model_cls` in eval mode: `config_cls(TINY_GEOMETRY | settings | the tokenizer's
    bos/eos/pad ids | overrides)`, weights from `seed` (same seed, same weights), then
    `randomize_norms_and_biases(seed + 1)`."""
    ids = {}
    if tokenizer is not None:
        ids = {
            key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
        ids["vocab_size"] = len(tokenizer)
    config = config_cls(**{**TINY_GEOMETRY, **settings, **ids, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    return randomize_norms_and_biases(model, seed + 1).eval()
