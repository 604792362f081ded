"""Shared pieces of the engine tests (not fixtures): prompts, targets, a fresh tiny base."""

from __future__ import annotations

from lorafleet.models import Base, fingerprint
from lorafleet.models.tiny import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "The film was a delight from start to finish.",
    "Tell me a joke about cats and dogs please",
    "Hi",
    "Two plus two is",
    "Once upon a time, in a land far away, there lived a",
    "Question: what is the capital of France? Answer:",
]


def tiny_base(tokenizer) -> Base:
    """A fresh tiny Llama (seed 0) as a Base; the engine changes its model in place."""
    model = tiny_llama(0, vocab_size=len(tokenizer))
    return Base("tiny", model, tokenizer, fingerprint(model), None, False, 0.0)
