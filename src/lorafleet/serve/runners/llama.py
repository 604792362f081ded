"""The engine's forward for Llama-layout decoders (LlamaForCausalLM: SmolLM2, Llama 2/3), which
the Qwen2, Qwen3, Mistral and Phi-3 runners refine."""

from __future__ import annotations

from torch import Tensor, nn

from lorafleet.layers import MultiLoRAContext
from lorafleet.serve.runners.base import ModelRunner, StepInputs, apply_rotary, layer_windows


class LlamaRunner(ModelRunner):
    """LlamaForCausalLM (SmolLM2, Llama 2/3): RMSNorm, RoPE from the model's own rotary module
    (so rope scaling variants match transformers; partial rotary too), GQA attention, SwiGLU
    MLP, tied or untied head. q/k/v share one base GEMM (layers/fused.py; biases included when
    every part has one), adapters added per projection, so MultiLoRA layers apply as when each
    linear is called as a module. Norms and the MLP are called as the model's own modules, so a
    family that differs only there (LayerNorm, another activation, a fused gate_up_proj) runs
    unchanged.

    Subclasses refine three hooks: `sliding` (which layers have a sliding window, see
    base.SLIDING_RULES; Llama has none), `heads` (per-head q/k norms, Qwen3) and
    `qkv_modules` / `project_qkv` (a fused qkv_proj, Phi-3)."""

    model_type = "llama"
    sliding = "none"

    def __init__(
        self,
        model: nn.Module,
        context: MultiLoRAContext | None,
        max_seqs: int,
        max_len: int,
        fuse: bool = True,
    ):
        super().__init__(model, context, max_seqs, max_len, fuse)
        self.windows = layer_windows(model.config, self.sliding, max_len)

    def heads(self, index: int, attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `index`'s q [T, H, D], k [T, Hkv, D], v [T, Hkv, D] of x [T, d], before RoPE."""
        q, k, v = self.project_qkv(index, x)  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
        rows, head_dim = x.shape[0], self.head_dim
        q = q.view(rows, -1, head_dim)  # [T, H*D] -> [T, H, D]
        k = k.view(rows, -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
        v = v.view(rows, -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
        return q, k, v

    def rotary(self, h: Tensor, inputs: StepInputs) -> tuple[Tensor, Tensor]:
        """cos, sin: [T, 1, R] (broadcast over heads; R = the rotary dims) for h [T, d]."""
        # The model's rotary module gives cos, sin: [1, T, R] for position ids [1, T].
        cos, sin = self.model.model.rotary_emb(h, inputs.positions.unsqueeze(0))
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [1, T, R] -> [T, 1, R]

    def forward(self, inputs: StepInputs) -> Tensor:
        """input_ids, positions, row_slots: [T] -> logits [B, vocab] float32 at `last_rows`.

        Per layer: h [T, d] -> norm -> q [T, H, D], k, v [T, Hkv, D] -> RoPE(q, k) -> cache
        write -> attention [T, H, D] (windowed on sliding layers) -> o_proj [T, d] (+ residual)
        -> norm -> MLP [T, d] (+ residual). The final norm and the head run on the B last rows
        only."""
        body = self.model.model
        h = body.embed_tokens(inputs.input_ids)  # [T, d]
        cos, sin = self.rotary(h, inputs)  # [T, 1, R] each
        for index, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)  # [T, d]
            q, k, v = self.heads(index, attn, x)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            self.write_kv(index, k, v, inputs)
            o = self.attend(index, q, k, v, inputs, attn.scaling, window=self.windows[index])
            h = h + attn.o_proj(o.reshape(x.shape[0], -1))  # [T, H, D] -> [T, H*D] -> [T, d]
            h = h + layer.mlp(layer.post_attention_layernorm(h))  # [T, d]
        last = body.norm(h.index_select(0, inputs.last_rows))  # [B, d]
        return self.model.lm_head(last).float()  # [B, vocab]
