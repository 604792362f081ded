"""The engine's forward for Llama-family models (LlamaForCausalLM: SmolLM2, Llama 2/3)."""

from __future__ import annotations

from torch import Tensor

from lorafleet.serve.runners.base import ModelRunner, StepInputs, rotate_half


class LlamaRunner(ModelRunner):
    """LlamaForCausalLM (SmolLM2, Llama 2/3): RMSNorm, RoPE from the model's own rotary module
    (so rope scaling variants match transformers), GQA attention, SwiGLU MLP, tied or untied
    head. q/k/v share one base GEMM (layers/fused.py), adapters added per projection, so
    MultiLoRA layers apply as when each linear is called as a module."""

    model_type = "llama"

    def forward(self, inputs: StepInputs) -> Tensor:
        """input_ids, positions, row_slots: [T] -> logits [B, vocab] float32 at `last_rows`.

        Per layer: h [T, d] -> RMSNorm -> q [T, H, D], k, v [T, Hkv, D] -> RoPE(q, k) ->
        cache write -> attention [T, H, D] -> o_proj [T, d] (+ residual) -> RMSNorm -> MLP [T, d]
        (+ residual). The final norm and the head run on the B last rows only."""
        body = self.model.model
        h = body.embed_tokens(inputs.input_ids)  # [T, d]
        # The model's rotary module gives cos, sin: [1, T, D] for position ids [1, T].
        cos, sin = body.rotary_emb(h, inputs.positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D], broadcast over heads
        head_dim = self.head_dim
        for index, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)  # [T, d]
            q, k, v = self.project_qkv(index, x)  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
            q = q.view(x.shape[0], -1, head_dim)  # [T, H*D] -> [T, H, D]
            k = k.view(x.shape[0], -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
            v = v.view(x.shape[0], -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.write_kv(index, k, v, inputs)
            o = self.attend(index, q, k, v, inputs, attn.scaling)  # [T, H, D]
            h = h + attn.o_proj(o.reshape(x.shape[0], -1))  # [T, H, D] -> [T, H*D] -> [T, d]
            h = h + layer.mlp(layer.post_attention_layernorm(h))  # [T, d]
        last = body.norm(h.index_select(0, inputs.last_rows))  # [B, d]
        return self.model.lm_head(last).float()  # [B, vocab]
