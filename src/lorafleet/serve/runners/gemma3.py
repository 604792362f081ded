"""The engine's forward for Gemma 3 text models (Gemma3ForCausalLM, e.g. gemma-3-270m)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorafleet.errors import LorafleetError
from lorafleet.layers import MultiLoRAContext
from lorafleet.serve.runners.base import ModelRunner, StepInputs, layer_windows, rotate_half

SLIDING = "sliding_attention"


class Gemma3Runner(ModelRunner):
    """Gemma3ForCausalLM (model_type gemma3_text) over the base runner's packing and KV cache.

    What differs from Llama, each taken from the model's own modules so it matches transformers:
    the embedding is scaled by sqrt(hidden) in the weight's dtype (`embed_tokens` does it);
    every norm is Gemma's RMSNorm (x * (1 + w), computed in float32); q and k are RMS-normed
    per head before RoPE; attention is scaled by query_pre_attn_scalar**-0.5 (`attn.scaling`);
    each block has sandwich norms (post-attention, pre- and post-feed-forward); the MLP is
    GELU-tanh gated; sliding-window layers see only their last `sliding_window` keys (prefill
    and decode, through `attend(window=...)`) and take RoPE from the local frequencies
    (rope_local_base_freq), full-attention layers from the global ones; the head's logits are
    soft-capped (tanh) when final_logit_softcapping is set. attn_logit_softcapping is ignored,
    as transformers' Gemma3 attention ignores it. The KV cache keeps every position on every
    layer (sliding layers read only their window)."""

    model_type = "gemma3_text"

    @classmethod
    def check(cls, model: nn.Module) -> None:
        if getattr(model.config, "use_bidirectional_attention", False):
            raise LorafleetError(
                "this gemma3_text model uses bidirectional attention (an embedding model); "
                "the engine serves causal language models only"
            )

    def __init__(
        self,
        model: nn.Module,
        context: MultiLoRAContext | None,
        max_seqs: int,
        max_len: int,
        fuse: bool = True,
    ):
        config = model.config
        super().__init__(model, context, max_seqs, max_len, fuse)
        n = config.num_hidden_layers
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        self.windows = layer_windows(config, "layer_types", max_len)

    def rotary(self, h: Tensor, positions: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        """cos, sin: [T, 1, D] (broadcast over heads) for h: [T, d], positions: [T], one kind."""
        body = self.model.model
        pos = positions.unsqueeze(0)  # [T] -> [1, T]
        if hasattr(body, "rotary_emb_local"):  # transformers 4.x: one module per layer kind
            module = body.rotary_emb_local if kind == SLIDING else body.rotary_emb
            cos, sin = module(h, pos)  # [1, T, D] each
        else:  # transformers 5.x: one module, per-kind frequencies
            cos, sin = body.rotary_emb(h, pos, kind)  # [1, T, D] each
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [1, T, D] -> [T, 1, D]

    def forward(self, inputs: StepInputs) -> Tensor:
        """input_ids, positions, row_slots: [T] -> logits [B, vocab] float32 at `last_rows`.

        Per layer: h [T, d] -> RMSNorm -> q [T, H, D], k, v [T, Hkv, D] -> q_norm, k_norm ->
        RoPE (local or global) -> cache write -> attention [T, H, D] (windowed on sliding
        layers) -> o_proj [T, d] -> post-attention norm (+ residual) -> pre-FF norm -> MLP ->
        post-FF norm (+ residual). The final norm, head and soft-cap run on the B last rows."""
        body = self.model.model
        h = body.embed_tokens(inputs.input_ids)  # [T, d], already scaled by sqrt(d)
        rope = {kind: self.rotary(h, inputs.positions, kind) for kind in set(self.layer_types)}
        rows, head_dim = h.shape[0], self.head_dim
        for index, layer in enumerate(body.layers):
            attn = layer.self_attn
            cos, sin = rope[self.layer_types[index]]  # [T, 1, D] each
            x = layer.input_layernorm(h)  # [T, d]
            q, k, v = self.project_qkv(index, x)  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
            q = q.view(rows, -1, head_dim)  # [T, H*D] -> [T, H, D]
            k = k.view(rows, -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
            v = v.view(rows, -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
            q, k = attn.q_norm(q), attn.k_norm(k)  # RMS over D, per head
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.write_kv(index, k, v, inputs)
            o = self.attend(index, q, k, v, inputs, attn.scaling, window=self.windows[index])
            o = attn.o_proj(o.reshape(rows, -1))  # [T, H, D] -> [T, H*D] -> [T, d]
            h = h + layer.post_attention_layernorm(o)
            m = layer.mlp(layer.pre_feedforward_layernorm(h))  # [T, d]
            h = h + layer.post_feedforward_layernorm(m)
        last = body.norm(h.index_select(0, inputs.last_rows))  # [B, d]
        logits = self.head(last)  # [B, vocab]
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
