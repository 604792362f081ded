"""The tiny random bases by family (`--base tiny`, `tiny-qwen3`, ...: models/sources.TINY)."""

from __future__ import annotations

from collections.abc import Callable

from lorafleet.errors import LorafleetError
from lorafleet.models.tiny import tiny_llama_base
from lorafleet.models.tiny_gemma import tiny_gemma_base
from lorafleet.models.tiny_mistral import tiny_mistral_base
from lorafleet.models.tiny_phi3 import tiny_phi3_base
from lorafleet.models.tiny_qwen2 import tiny_qwen2_base
from lorafleet.models.tiny_qwen3 import tiny_qwen3_base

# transformers model_type -> seed -> (model in eval mode, float32; its tokenizer).
BUILDERS: dict[str, Callable[[int], tuple]] = {
    "llama": tiny_llama_base,
    "gemma3_text": tiny_gemma_base,
    "qwen2": tiny_qwen2_base,
    "qwen3": tiny_qwen3_base,
    "mistral": tiny_mistral_base,
    "phi3": tiny_phi3_base,
}


def build_tiny_base(family: str, seed: int = 0) -> tuple:
    """(model, tokenizer) of the tiny base of `family`, built in memory from its config in
    milliseconds; the same seed gives the same weights (and fingerprint) in every process."""
    if family not in BUILDERS:
        raise LorafleetError(
            f"no tiny base for family {family!r}: use one of {', '.join(BUILDERS)}"
        )
    return BUILDERS[family](seed)
