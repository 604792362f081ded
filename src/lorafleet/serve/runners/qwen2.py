"""The engine's forward for Qwen2 / Qwen2.5 (Qwen2ForCausalLM)."""

from __future__ import annotations

from lorafleet.serve.runners.llama import LlamaRunner


class Qwen2Runner(LlamaRunner):
    """Qwen2ForCausalLM (Qwen2, Qwen2.5, Qwen2.5-Coder): the Llama layout with biases on q_proj,
    k_proj and v_proj (added by the fused base GEMM, layers/fused.py; an adapter's delta is
    added after the bias, as PEFT's LoRA layer does). With use_sliding_window, the layers that
    `layer_types` marks sliding_attention (from max_window_layers on) see only their last
    `sliding_window` keys, as transformers' Qwen2 does."""

    model_type = "qwen2"
    sliding = "layer_types"
