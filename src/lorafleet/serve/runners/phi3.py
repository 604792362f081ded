"""The engine's forward for Phi-3 (Phi3ForCausalLM: Phi-3/3.5-mini, Phi-4-mini)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorafleet.layers import MultiLoRAContext
from lorafleet.serve.runners.base import StepInputs
from lorafleet.serve.runners.llama import LlamaRunner
from lorafleet.serve.sequence import Sequence


class Phi3Runner(LlamaRunner):
    """Phi3ForCausalLM: the Llama layout with q, k and v from ONE linear, `qkv_proj` (output
    [q | k | v], H*D + 2*Hkv*D wide), and gate and up from one `gate_up_proj` inside the MLP
    (called as the model's module). Adapters target those fused linears as PEFT does: a LoRA
    on qkv_proj is one A [r, d] / B [H*D + 2*Hkv*D, r] pair whose output is split with the
    base's. RoPE may cover only part of each head (partial_rotary_factor, Phi-4-mini); a
    `sliding_window` applies to every layer (as Mistral).

    longrope (Phi-3-128k, Phi-3.5-mini, Phi-4-mini): transformers picks the long or short
    factors for a whole forward from its largest position (long past
    original_max_position_embeddings, L), and its generate recomputes a sequence's whole cache
    in the first forward past L (so every key is then rotated with the long factors). Here
    each row gets the factors its own sequence's forward would pick (a prefill row by its
    prompt length, a decode row by its position), and a sequence whose decode step is the
    first past L (L tokens cached) is run as a prefill of all its tokens, rewriting its cache:
    a batch mixing short and long sequences matches each sequence's own generate."""

    model_type = "phi3"
    sliding = "every_layer"

    def __init__(
        self,
        model: nn.Module,
        context: MultiLoRAContext | None,
        max_seqs: int,
        max_len: int,
        fuse: bool = True,
    ):
        super().__init__(model, context, max_seqs, max_len, fuse)
        config = model.config
        q = config.num_attention_heads * self.head_dim
        kv = config.num_key_value_heads * self.head_dim
        self.sizes = [q, kv, kv]
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope = rope or {}
        self.long_after = None  # a forward this long or shorter uses the short factors
        if rope.get("rope_type", rope.get("type")) == "longrope":
            self.long_after = int(
                rope.get("original_max_position_embeddings")
                or config.original_max_position_embeddings
            )
        # A prompt's keys depend on its whole forward's length here: no prefix reuse.
        self.prefix_reusable = self.long_after is None

    def run(self, prefill: list[Sequence], decode: list[Sequence]) -> Tensor:
        """As ModelRunner.run; decode sequences at the longrope switch (L tokens cached) run as
        prefills of all their tokens, their logits rows returned in their decode places."""
        crossing = set()
        if self.long_after is not None:
            crossing = {id(s) for s in decode if s.num_cached == self.long_after}
        if not crossing:
            return super().run(prefill, decode)
        moved = [s for s in decode if id(s) in crossing]
        rest = [s for s in decode if id(s) not in crossing]
        # Rows: prefill, moved, rest, then prompt-logprob rows (a moved sequence has generated
        # tokens, so it asks for none: they are all `prefill`'s, in its order).
        logits = super().run(prefill + moved, rest)
        row = {id(s): len(prefill) + i for i, s in enumerate(moved + rest)}
        p = len(prefill) + len(decode)
        order = [*range(len(prefill)), *(row[id(s)] for s in decode), *range(p, logits.shape[0])]
        return logits[torch.tensor(order, device=logits.device)]

    def qkv_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn.qkv_proj]

    def project_qkv(self, index: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv_proj(x) [T, H*D + 2*Hkv*D] split into q [T, H*D], k, v [T, Hkv*D] (views)."""
        (qkv,) = self.qkv[index](x)
        q, k, v = qkv.split(self.sizes, dim=-1)
        return q, k, v

    def rotary(self, h: Tensor, inputs: StepInputs) -> tuple[Tensor, Tensor]:
        """cos, sin [T, 1, R]; with longrope, per row the factors of its own sequence's forward
        (rows grouped into one rotary call per choice, each call deciding by its own largest
        position: a whole long prompt, or decode rows past the limit, reach it)."""
        if self.long_after is None:
            return super().rotary(h, inputs)
        span = inputs.positions + 1  # [T]: a decode row's forward ends at its own position
        for _, start, n, offset in inputs.prefill:  # a prefill row's forward: its whole prompt
            span[start : start + n] = offset + n
        long = span > self.long_after  # [T] bool
        if bool(long.all()) or not bool(long.any()):
            return super().rotary(h, inputs)
        rotary_emb = self.model.model.rotary_emb
        parts = []
        for rows in (long.nonzero().squeeze(1), (~long).nonzero().squeeze(1)):  # [n_group] each
            cos, sin = rotary_emb(h[rows], inputs.positions[rows].unsqueeze(0))  # [1, n, R]
            parts.append((rows, cos[0], sin[0]))
        width = parts[0][1].shape[-1]
        cos = h.new_empty(h.shape[0], width, dtype=parts[0][1].dtype)  # [T, R]
        sin = torch.empty_like(cos)
        for rows, c, s in parts:
            cos[rows], sin[rows] = c, s
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [T, R] -> [T, 1, R]
