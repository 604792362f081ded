"""The engine's forward for Qwen3 (Qwen3ForCausalLM)."""

from __future__ import annotations

from torch import Tensor, nn

from lorafleet.serve.runners.llama import LlamaRunner


class Qwen3Runner(LlamaRunner):
    """Qwen3ForCausalLM: the Llama layout with q and k RMS-normed over each head's D dims
    (attn.q_norm / attn.k_norm, before RoPE), optional biases (attention_bias) and, as Qwen2,
    sliding windows on the layers `layer_types` marks sliding_attention."""

    model_type = "qwen3"
    sliding = "layer_types"

    def heads(self, index: int, attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [T, H, D], k [T, Hkv, D] normed per head, v [T, Hkv, D] as projected."""
        q, k, v = super().heads(index, attn, x)
        return attn.q_norm(q), attn.k_norm(k), v
