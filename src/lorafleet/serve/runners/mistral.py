"""The engine's forward for Mistral (MistralForCausalLM) and Ministral."""

from __future__ import annotations

from lorafleet.serve.runners.llama import LlamaRunner


class MistralRunner(LlamaRunner):
    """MistralForCausalLM (Mistral 7B v0.1-v0.3, Mistral NeMo's text model): the Llama layout
    whose `sliding_window` (when set) applies to every layer: the query at position i sees keys
    j with i - window < j <= i, in prefill and decode (`attend(window=...)`), as transformers'
    sliding-window mask. The KV cache keeps every position (a window reads only its last keys).
    A window at least max_seq_len long is plain causal attention."""

    model_type = "mistral"
    sliding = "every_layer"


class MinistralRunner(LlamaRunner):
    """MinistralForCausalLM: Mistral's layout with Qwen2's per-layer windows (`layer_types`)."""

    model_type = "ministral"
    sliding = "layer_types"
