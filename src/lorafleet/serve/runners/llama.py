"""The engine's forward for Llama-layout decoders (LlamaForCausalLM: SmolLM2, Llama 2/3), which
the Qwen2, Qwen3, Mistral and Phi-3 runners refine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet import kernels
from lorafleet.layers import (
    FusedProjections,
    MultiLoRAContext,
    base_layer,
    base_product,
    can_fuse,
    fast_norm,
    is_llama_rms_norm,
)
from lorafleet.serve.runners.base import ModelRunner, StepInputs, apply_rotary, layer_windows


class LlamaRunner(ModelRunner):
    """LlamaForCausalLM (SmolLM2, Llama 2/3): RMSNorm, RoPE from the model's own rotary module
    (so rope scaling variants match transformers; partial rotary too), GQA attention, SwiGLU
    MLP, tied or untied head. q/k/v share one base GEMM (layers/fused.py; biases included when
    every part has one), adapters added per projection, so MultiLoRA layers apply as when each
    linear is called as a module. Norms and the MLP are called as the model's own modules, so a
    family that differs only there (LayerNorm, another activation, a fused gate_up_proj) runs
    unchanged; where they are Llama's own (RMSNorm, the SiLU MLP over plain linears) exact
    shortcuts run instead (fewer ops and calls per block, the same results bit for bit).

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
        # Each block's two norms and the final one as exact shortcuts where they are
        # Llama's RMSNorm (layers/norm.py: 1-3 ops instead of 8), else the modules.
        body = model.model
        self.norms = [
            (fast_norm(b.input_layernorm), fast_norm(b.post_attention_layernorm))
            for b in body.layers
        ]
        self.final_norm = fast_norm(body.norm)
        # Per block, when o_proj and a Llama SwiGLU MLP are plain or quantised linears
        # underneath: (o, gate, up, down) base layers, called directly by `forward` while no row
        # uses an adapter (the same products as the modules', without ~40 module calls per
        # block); else None, and the modules are called.
        self.plain = [plain_block(b) for b in body.layers]
        # gate and up of a plain block as one product where that is faster (`one_product`)
        self.gate_up = [
            fused_gate_up(b, p) if fuse else None
            for b, p in zip(body.layers, self.plain, strict=True)
        ]
        # Decode-only steps run `decode_forward` (lorafleet's decode-layer kernels: norms,
        # RoPE + KV write + attention, SiLU in 4 calls per layer instead of ~40 torch ops) where
        # the kernels are built and every norm is Llama's RMSNorm in the model's dtype.
        self.decode_norms = decode_norms(model, self.dtype)
        self.fast_decode = (
            fuse
            and self.decode_norms is not None
            and type(self).heads is LlamaRunner.heads  # no per-head q/k norms (Qwen3's)
            and kernels.decode_ready(self.dtype, self.head_dim)
        )
        # ... and all layers in one call (kernels.decode_stack) for a few rows on the base
        # when every block is a plain float one with fused q/k/v and gate/up
        self.stackable = self.fast_decode and all(
            self.stack_block(i) for i in range(len(self.plain))
        )

    def fused_projections(self) -> list[FusedProjections]:
        return super().fused_projections() + [g for g in self.gate_up if g is not None]

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
        only (all rows, without a gather, when every row is a decode row)."""
        body = self.model.model
        h = body.embed_tokens(inputs.input_ids)  # [T, d]
        cos, sin = self.rotary(h, inputs)  # [T, 1, R] each
        if self.fast_decode and self.decodes_only(inputs) and cos.shape[-1] == self.head_dim:
            return self.decode_forward(h, cos[:, 0], sin[:, 0], inputs)  # [T, 1, D] -> [T, D]
        signed = signed_sin(sin, self.head_dim)  # None: partial rotary (apply_rotary slices)
        adapted = self.context is not None and self.context.active  # some row uses an adapter
        for index, layer in enumerate(body.layers):
            attn = layer.self_attn
            norm1, norm2 = self.norms[index]
            x = norm1(h)  # [T, d]
            q, k, v = self.heads(index, attn, x)
            if signed is None:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            else:
                q, k = rotate_qk(q, k, cos, signed)
            self.write_kv(index, k, v, inputs)
            o = self.attend(index, q, k, v, inputs, attn.scaling, window=self.windows[index])
            o = o.reshape(x.shape[0], -1)  # [T, H, D] -> [T, H*D]
            plain = None if adapted else self.plain[index]
            if plain is None:
                h = h + attn.o_proj(o)  # [T, d]
                h = h + self.adapted_mlp(index, layer.mlp, norm2(h))  # [T, d]
                continue
            o_proj, gate, up, down = plain  # no adapter row: each module is its base layer
            h = h + base_product(o_proj, o)  # [T, d]
            x = norm2(h)
            gate_up = self.gate_up[index]
            if one_product(gate_up, x):
                g, u = gate_up(x)  # [T, inter] each: column blocks of one product
                x = F.silu(g) * u
            else:
                x = F.silu(base_product(gate, x)) * base_product(up, x)  # [T, inter]
            h = h + base_product(down, x)  # [T, inter] -> [T, d]
        if not self.decodes_only(inputs):
            h = h.index_select(0, inputs.last_rows)  # [B, d]; decode rows only: already so
        return self.head(self.final_norm(h)).float()  # [B, vocab]

    def decodes_only(self, inputs: StepInputs) -> bool:
        """Whether the step is decode rows only, each one's logits wanted (no prompt rows)."""
        return inputs.n_prefill_rows == 0 and inputs.last_rows.shape[0] == inputs.positions.shape[0]

    def decode_forward(self, h: Tensor, cos: Tensor, sin: Tensor, inputs: StepInputs) -> Tensor:
        """`forward` of a decode-only step through lorafleet's decode-layer kernels: h [n, d]
        embedded rows, cos, sin [n, D] -> logits [n, vocab] float32. Per layer: q/k/v product
        -> `kernels.decode_attention` (RoPE, cache write, attention) -> o_proj -> residual add
        and norm (one call) -> gate/up -> SiLU * up (one call when they are fused) -> down ->
        residual add and the next layer's norm (one call). The same arithmetic as `forward`
        (kernels/decode.cpp's semantics), rounded in other places."""
        body = self.model.model
        adapted = self.context is not None and self.context.active
        if self.stackable and not adapted and self.gemv_rows(h):
            x = kernels.decode_stack(h, cos, sin, *self.stack_arguments(inputs))  # [n, d]
            return self.head(x).float()  # [n, vocab]
        first, _ = self.decode_norms[0]
        x = kernels.rms_norm(h, first.weight, first.variance_epsilon)  # [n, d]
        for index, layer in enumerate(body.layers):
            attn = layer.self_attn
            q, k, v = self.project_qkv(index, x)  # [n, H*D], [n, Hkv*D], [n, Hkv*D]
            o = self.attend_decode(index, q, k, v, cos, sin, inputs, attn.scaling)  # [n, H*D]
            norm2 = self.decode_norms[index][1]
            plain = None if adapted else self.plain[index]
            if plain is None:
                h, x = kernels.add_rms_norm(h, attn.o_proj(o), norm2.weight, norm2.variance_epsilon)
                delta = self.adapted_mlp(index, layer.mlp, x)  # [n, d]
            else:
                o_proj, _, _, down = plain  # no adapter row: each module is its base layer
                delta = base_product(o_proj, o)  # [n, d]
                h, x = kernels.add_rms_norm(h, delta, norm2.weight, norm2.variance_epsilon)
                delta = base_product(down, self.swiglu(index, x))  # [n, inter] -> [n, d]
            after = self.decode_norms[index + 1][0] if index + 1 < len(body.layers) else body.norm
            h, x = kernels.add_rms_norm(h, delta, after.weight, after.variance_epsilon)
        return self.head(x).float()  # [n, vocab]

    def stack_block(self, index: int) -> bool:
        """Whether block `index` is one kernels.decode_stack computes: plain float linears,
        q/k/v and gate/up fused, no bias on o_proj, gate/up or down."""
        plain, qkv, gate_up = self.plain[index], self.qkv[index], self.gate_up[index]
        return (
            plain is not None
            and all(type(m) is nn.Linear and m.bias is None for m in plain)
            and qkv.fused
            and qkv.quantised is None
            and gate_up is not None
            and gate_up.quantised is None
            and gate_up.bias is None
        )

    def gemv_rows(self, h: Tensor) -> bool:
        """Whether h's rows are few enough for every product to run the GEMV (the rows the
        packed copies leave to it, kernels/packed.py)."""
        return h.shape[0] <= kernels.packed.GEMV_ROWS and kernels.covers(h, self.qkv[0].weight)

    def stack_arguments(self, inputs: StepInputs) -> tuple:
        """kernels.decode_stack's arguments after h, cos, sin (stack.cpp's order), the weights
        read now (a cast or reload replaces them)."""
        body = self.model.model
        weights, eps = [], []
        for index in range(len(body.layers)):
            norm1, norm2 = self.decode_norms[index]
            after = self.decode_norms[index + 1][0] if index + 1 < len(body.layers) else body.norm
            qkv, gate_up = self.qkv[index], self.gate_up[index]
            o_proj, _, _, down = self.plain[index]
            bias = qkv.bias if qkv.bias is not None else qkv.weight.new_empty(0)
            weights += [norm1.weight, qkv.weight, bias, o_proj.weight, norm2.weight]
            weights += [gate_up.weight, down.weight, after.weight]
            eps += [norm1.variance_epsilon, norm2.variance_epsilon]
        eps.append(body.norm.variance_epsilon)
        scales = [layer.self_attn.scaling for layer in body.layers]
        windows = [w or 0 for w in self.windows]
        return (
            inputs.decode_slots,
            inputs.positions,
            weights,
            self.kv.k,
            self.kv.v,
            eps,
            scales,
            windows,
        )

    def attend_decode(
        self,
        index: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: Tensor,
        sin: Tensor,
        inputs: StepInputs,
        scale: float,
    ) -> Tensor:
        """Layer `index`'s RoPE, KV write and attention of decode rows in one kernel call:
        q [n, H*D], k, v [n, Hkv*D] (before RoPE), cos, sin [n, D] -> o [n, H*D]."""
        k_cache, v_cache = self.kv.layer(index)  # [S, Hkv, max_len, D] each
        return kernels.decode_attention(
            q,
            k,
            v,
            cos,
            sin,
            k_cache,
            v_cache,
            inputs.decode_slots,
            inputs.positions,
            scale,
            self.windows[index],
        )

    def adapted_mlp(self, index: int, mlp: nn.Module, x: Tensor) -> Tensor:
        """Block `index`'s MLP of x [T, d] -> [T, d] in a step where some row uses an adapter,
        equal to mlp(x): where gate and up take one product (`one_product`), the fused
        projections (the fused weight's packed copy or GEMV, then each module's adapter terms;
        gate's and up's own weights are views no kernel packs, so calling them ran MKL in
        float32 and an unbucketed oneDNN bfloat16 GEMM); else the module."""
        gate_up = self.gate_up[index]
        if not one_product(gate_up, x):
            return mlp(x)
        g, u = gate_up(x)  # [T, inter] each
        return mlp.down_proj(F.silu(g) * u)  # [T, inter] -> [T, d]

    def swiglu(self, index: int, x: Tensor) -> Tensor:
        """silu(gate(x)) * up(x) [n, inter] of a plain block's MLP on x [n, d]: one product
        and one kernel call where gate and up share one (as `forward`), else two products."""
        _, gate, up, _ = self.plain[index]
        gate_up = self.gate_up[index]
        if one_product(gate_up, x):
            return kernels.silu_mul(gate_up.base(x))  # [n, 2 * inter] -> [n, inter]
        return F.silu(base_product(gate, x)) * base_product(up, x)


def decode_norms(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, nn.Module]] | None:
    """Each block's (input, post-attention) norm when they and the final norm are all Llama's
    RMSNorm with weights in `dtype` (what the decode-layer kernels compute), else None."""
    body = model.model
    pairs = [(b.input_layernorm, b.post_attention_layernorm) for b in body.layers]
    norms = [n for pair in pairs for n in pair] + [body.norm]
    if all(is_llama_rms_norm(n) and n.weight.dtype == dtype for n in norms):
        return pairs
    return None


def plain_block(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None:
    """(o_proj, gate_proj, up_proj, down_proj) as the base layers computing them (plain
    nn.Linears or QuantLinears) when `block`'s MLP runs LlamaMLP's forward
    (down(act(gate(x)) * up(x))) with SiLU, else None."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = getattr(block, "mlp", None)
    act = getattr(mlp, "act_fn", None)
    silu = type(act) is nn.SiLU or (
        same_forward(act, SiLUActivation) and "forward" not in vars(act)  # no hub kernel
    )
    if not (same_forward(mlp, LlamaMLP) and silu):
        return None
    parts = (block.self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    linears = tuple(base_layer(m) for m in parts)
    return None if any(lin is None for lin in linears) else linears


def fused_gate_up(block: nn.Module, plain: tuple | None) -> FusedProjections | None:
    """A plain block's gate and up modules as one FusedProjections (their base weights become
    views of one; calling it adds each module's adapter terms to its column block, as q/k/v),
    or None when the block is not plain or they cannot share one (`can_fuse`)."""
    parts = (block.mlp.gate_proj, block.mlp.up_proj) if plain is not None else ()
    if not parts or not can_fuse(parts):
        return None
    return FusedProjections(parts)


def one_product(gate_up: FusedProjections | None, x: Tensor) -> bool:
    """Whether a block's fused gate/up computes x [T, d] as one product: always when quantised
    (one kernel call, QuantLinear.concat) or bfloat16; float32 where lorafleet's GEMV or the
    fused weight's packed copy (kernels/packed.py; gate's and up's own weights are views of it,
    never packed) runs it. Measured on the 2-core AVX-512 CPU (SmolLM2's [576] -> 2 x [1536],
    median of 7): bfloat16 one [T, 3072] GEMM 7-14 % faster than two at 8-64 rows; float32
    MKL's two GEMMs 4-7 % faster than its one at 32-64 (12 % on the AVX2 host, BENCHMARKS.md),
    but MKL is what only an unpacked weight still runs."""
    if gate_up is None:
        return False
    if gate_up.quantised is not None or gate_up.weight.dtype != torch.float32:
        return True
    return gate_up.gemv(x) or kernels.packed.copy_for(x, gate_up.weight) is not None


def same_forward(module: nn.Module | None, cls: type) -> bool:
    """Whether `module`'s class runs `cls.forward` (the same bytecode and names: a copy of
    transformers' class in another family counts)."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    ref = cls.forward.__code__
    return code is not None and (code.co_code, code.co_names) == (ref.co_code, ref.co_names)


def signed_sin(sin: Tensor, head_dim: int) -> Tensor | None:
    """sin [T, 1, D] with its first half negated (for `rotate`), or None when RoPE covers only
    part of each head (sin narrower than `head_dim`: `apply_rotary` slices)."""
    if sin.shape[-1] != head_dim:
        return None
    half = head_dim // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # [T, 1, D]


def rotate(x: Tensor, cos: Tensor, signed: Tensor) -> Tensor:
    """RoPE on x [T, heads, D] with cos, signed [T, 1, D]: x * cos + rotate_half(x) * sin,
    bit for bit, in four ops: rotate_half(x) = cat(-x2, x1) and roll(x, D/2) = cat(x2, x1), and
    (-a) * b == a * (-b) exactly in floating point, so rotate_half(x) * sin == roll(x) * signed."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed


def rotate_qk(q: Tensor, k: Tensor, cos: Tensor, signed: Tensor) -> tuple[Tensor, Tensor]:
    """`rotate` on q [T, H, D] and k [T, Hkv, D]: in one pass over [T, H + Hkv, D] when k's
    heads follow q's in memory (column blocks of one fused q/k/v GEMM), else one each."""
    joint = adjacent_heads(q, k)
    if joint is None:
        return rotate(q, cos, signed), rotate(k, cos, signed)
    out = rotate(joint, cos, signed)  # [T, H + Hkv, D]
    heads = q.shape[1]
    return out[:, :heads], out[:, heads:]  # views: [T, H, D], [T, Hkv, D]


def adjacent_heads(q: Tensor, k: Tensor) -> Tensor | None:
    """q [T, H, D] and k [T, Hkv, D] as one view [T, H + Hkv, D] when they share storage and
    k's heads start where q's end (same strides), else None."""
    if (
        q.dtype != k.dtype
        or q.shape[0] != k.shape[0]
        or q.shape[2] != k.shape[2]
        or q.stride()[1:] != k.stride()[1:]
        or (q.shape[0] > 1 and q.stride(0) != k.stride(0))  # a size-1 dim's stride is free
        or q.stride(2) != 1
        or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
        or k.data_ptr() != q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size()
    ):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
