"""What every runner shares: packed step rows, the KV cache, attention, RoPE's rotate_half."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet import kernels
from lorafleet.layers import FusedProjections, MultiLoRAContext, RowMixture
from lorafleet.serve.kv_cache import KVCache
from lorafleet.serve.sequence import Sequence

# Float32 decode rows at or above which attention runs as two grouped matmuls instead of SDPA.
# Measured on the 2-core CPU (SmolLM2: 9 query / 3 KV heads, D 64, 120 keys, 2 threads): 32 rows
# took 189 us vs SDPA's 285 us in float32; one row: SDPA 19 us vs 27 us (BENCHMARKS.md). In
# bfloat16, SDPA with each KV head's query heads as its query positions (`sdpa_decode_attention`)
# beats both at every row count (one row: 31 us vs 109 us for SDPA over 9 heads with a mask;
# 32 rows: 0.43 ms vs 2.9 ms grouped, on a loaded machine): other dtypes always take it.
GROUPED_MIN_ROWS = 2


@dataclass
class StepInputs:
    """One forward's rows: prefill sequences' prompts packed back to back (no padding), then
    one row per decoding sequence. T = prefill tokens + decoding sequences, B = sequences.
    A prefill whose first `offset` tokens' K/V are in its slot already (the prefix cache put
    them there) has rows for tokens offset..n-1 only, at positions offset..n-1."""

    input_ids: Tensor  # [T] long
    positions: Tensor  # [T] long, each row's position in its own sequence
    row_slots: Tensor  # [T] long, each row's adapter slot (0 = base) for MultiLoRAContext
    # (kv_slot, first row, rows, offset) per prefill sequence: its rows are its tokens
    # offset..offset+rows-1 (offset 0 unless the prefix cache supplied the first ones)
    prefill: list[tuple[int, int, int, int]]
    n_prefill_rows: int  # rows [0, n_prefill_rows) are prefill, the rest decode
    decode_slots: Tensor  # [n_dec] long, KV slot per decode row
    decode_range: tuple[int, int] | None  # (first, end) when decode_slots is a contiguous range
    decode_max_len: int  # longest context among decode rows (its new token included)
    # [B + P] long: the row whose logits pick each sequence's next token, then the P prompt
    # rows of prefill sequences that ask for prompt_logprobs (the runners' head reads these)
    last_rows: Tensor
    decode_min_len: int = 0  # shortest context among decode rows (bounds sliding-window reads)
    mixtures: list[RowMixture] = field(default_factory=list)  # rows over several adapters
    # Masks of prefills after a cached prefix, built by the first layer that needs each one:
    # (offset, rows, window) -> [rows, keys read] bool (the same on every layer of a kind).
    prefix_masks: dict[tuple, Tensor] = field(default_factory=dict)


def rotate_half(x: Tensor) -> Tensor:
    """RoPE's rotation of the last dim: [..., D] -> [..., D], halves swapped, first negated."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on x [T, heads, D] with cos, sin [T, 1, R] (R <= D): the first R dims rotate
    (x * cos + rotate_half(x) * sin), the other D - R pass through unchanged (partial rotary,
    e.g. Phi-4-mini's 3/4), as transformers' apply_rotary_pos_emb."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# How a family's config places sliding windows: never (Llama ignores `sliding_window`), on every
# layer (Mistral, Phi-3, Starcoder2: `sliding_window` applies to all), or on the layers that
# `layer_types` marks "sliding_attention" (Qwen2, Qwen3, Ministral, Gemma 3).
SLIDING_RULES = ("none", "every_layer", "layer_types")


def layer_windows(config, rule: str, max_len: int) -> list[int | None]:
    """Each layer's sliding window under `rule` (SLIDING_RULES), None = full causal attention.
    A window of at least `max_len` never masks a key the cache can hold: None as well."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if rule == "none" or not window or window >= max_len:
        return [None] * n
    if rule == "every_layer":
        return [window] * n
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * n
    return [window if kind == "sliding_attention" else None for kind in kinds]


class ModelRunner:
    """Architecture-independent parts: the KV cache, packing sequences into rows, attention.

    A subclass per model family implements `forward` over its own module layout (see
    LlamaRunner, Gemma3Runner) and calls `write_kv` and `attend` per layer; `attend` takes a
    sliding window for local-attention layers."""

    model_type = ""
    # Whether a token's K/V depend only on the tokens before it (not on the forward it ran in),
    # so a prefix's K/V may be reused by a later prefill (serve/prefix_cache.py). False where a
    # forward's length changes every row (Phi-3's longrope picks factors per forward).
    prefix_reusable = True

    def __init__(
        self,
        model: nn.Module,
        context: MultiLoRAContext | None,
        max_seqs: int,
        max_len: int,
        fuse: bool = True,
    ):
        self.model = model
        self.context = context
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers, kv_heads, self.head_dim = self.geometry()
        self.kv = KVCache(
            layers, max_seqs, kv_heads, max_len, self.head_dim, self.dtype, self.device
        )
        # One base GEMM for q/k/v per layer (layers/fused.py); fuse=False calls each projection
        # on its own. gate/up are not fused here: measured on the 2-core CPU, one [T, 576] x
        # [576, 3072] GEMM was 12 % slower than two of [576, 1536] at 32 rows (BENCHMARKS.md);
        # runners that call the MLP's linears themselves fuse them where one product is faster
        # (llama.one_product: the GEMV's rows, bfloat16, quantised).
        self.qkv = [FusedProjections(self.qkv_modules(b), fuse) for b in model.model.layers]
        self.fused = all(f.fused for f in self.qkv)

    def pack_weights(self) -> int:
        """Give every dense float base weight this runner multiplies a oneDNN-packed copy
        (kernels.pack: products above the GEMV's rows run on it): the fused projections'
        weights and each plain nn.Linear's own weight (not the parts' views of a fused one),
        the head included. Returns the copies' bytes (0 where none is made). Called once the
        runner has fused what it fuses."""
        weights = [f.weight for f in self.fused_projections() if f.fused and f.quantised is None]
        for module in self.model.modules():
            if type(module) is nn.Linear and owns_storage(module.weight):
                weights.append(module.weight)
        unique = {id(w): w for w in weights}.values()  # a tied head and embedding: once
        return sum(w.numel() * w.element_size() for w in unique if kernels.pack(w))

    def fused_projections(self) -> list[FusedProjections]:
        """Every FusedProjections this runner computes through (q/k/v; a subclass adds its
        own, e.g. LlamaRunner's gate/up)."""
        return list(self.qkv)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Raise a one-line LorafleetError if this runner cannot serve `model`'s config."""

    def head(self, h: Tensor) -> Tensor:
        """The model's output head on h [B, d] -> [B, vocab]: a plain nn.Linear through
        `kernels.linear` (the decode GEMV for a few rows: the head is the largest single weight
        of a small model), anything else as its module."""
        lm_head = self.model.lm_head
        if type(lm_head) is nn.Linear:
            return kernels.linear(h, lm_head.weight, lm_head.bias)
        return lm_head(h)

    def geometry(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) for the KV cache, from the model's config (head_dim, or
        hidden size / heads when the config has none)."""
        config = self.model.config
        head_dim = getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers, config.num_key_value_heads, head_dim

    def forward(self, inputs: StepInputs) -> Tensor:
        raise NotImplementedError

    def qkv_modules(self, block: nn.Module) -> list[nn.Module]:
        """The linears of `block` that `project_qkv` reads through one FusedProjections:
        q_proj, k_proj, v_proj (a family with one fused qkv_proj returns that alone)."""
        attn = block.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def project_qkv(self, index: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `index`'s q, k, v projections of x [T, d]: [T, H*D], [T, Hkv*D], [T, Hkv*D]."""
        q, k, v = self.qkv[index](x)
        return q, k, v

    def build(self, prefill: list[Sequence], decode: list[Sequence]) -> StepInputs:
        """Pack a step's sequences into rows (prefills from position `seq.prefix_hit`, usually
        0: the prompt, plus the generated tokens of a preempted sequence that resumes; then
        decodes)."""
        ids, positions, slots, segments, last, mixtures = [], [], [], [], [], []
        for seq in prefill:
            tokens = seq.prefill_ids
            offset = seq.prefix_hit  # leading tokens whose K/V are in its slot already
            start, n = len(ids), len(tokens) - offset  # n: this prefill's rows (>= 1)
            ids += tokens[offset:]
            positions += range(offset, offset + n)
            slots += [seq.lora_slot] * n
            segments.append((seq.kv_slot, start, n, offset))
            last.append(start + n - 1)
            if seq.mixture is not None:  # its rows have slot 0 in the map
                mixtures.append(_row_mixture(range(start, start + n), seq))
        n_prefill = len(ids)
        for seq in decode:
            # The last sampled token is not in the cache yet: it is this step's input.
            last.append(len(ids))
            if seq.mixture is not None:
                mixtures.append(_row_mixture((len(ids),), seq))
            ids.append(seq.last_token)
            positions.append(seq.num_cached)
            slots.append(seq.lora_slot)
        for seq, (_, start, n, offset) in zip(prefill, segments, strict=True):
            # Positions 0..n-2 score prompt tokens 1..n-1 (a resumed sequence has them already;
            # the prefix cache never gives such a request an offset).
            if seq.params.prompt_logprobs is not None and not seq.generated and offset == 0:
                last += range(start, start + n - 1)
        kv_slots = [seq.kv_slot for seq in decode]
        first = kv_slots[0] if kv_slots else 0
        contiguous = bool(kv_slots) and kv_slots == list(range(first, first + len(kv_slots)))
        as_long = {"dtype": torch.long, "device": self.device}
        return StepInputs(
            input_ids=torch.tensor(ids, **as_long),
            positions=torch.tensor(positions, **as_long),
            # On the CPU on purpose: `.any()` below costs no device sync, and the context
            # moves it to each layer's device once per step (layers/linear.py).
            row_slots=torch.tensor(slots, dtype=torch.long, device="cpu"),
            prefill=segments,
            n_prefill_rows=n_prefill,
            decode_slots=torch.tensor(kv_slots, **as_long),
            decode_range=(first, first + len(kv_slots)) if contiguous else None,
            decode_max_len=max((s.num_cached + 1 for s in decode), default=0),
            last_rows=torch.tensor(last, **as_long),
            decode_min_len=min((s.num_cached + 1 for s in decode), default=0),
            mixtures=mixtures,
        )

    @torch.inference_mode()
    def run(self, prefill: list[Sequence], decode: list[Sequence]) -> Tensor:
        """Logits [B, vocab] (float32) for prefill + decode sequences, in that order; then,
        only for prefill sequences whose params ask for prompt_logprobs (in prefill order),
        their n - 1 first prompt positions' logits (n = prompt length)."""
        inputs = self.build(prefill, decode)
        if self.context is not None:
            row_slots = inputs.row_slots if inputs.row_slots.any() else None
            self.context.set_slots(row_slots, inputs.mixtures)
        try:
            return self.forward(inputs)
        finally:
            if self.context is not None:
                self.context.clear()

    def write_kv(self, layer: int, k: Tensor, v: Tensor, inputs: StepInputs) -> None:
        """Store this step's keys and values (k, v: [T, kv_heads, head_dim]) in the cache."""
        k_cache, v_cache = self.kv.layer(layer)  # [S, kv_heads, max_len, head_dim] each
        for slot, start, n, offset in inputs.prefill:
            rows, at = slice(start, start + n), slice(offset, offset + n)
            k_cache[slot, :, at] = k[rows].transpose(0, 1)  # [n, Hkv, D] -> [Hkv, n, D]
            v_cache[slot, :, at] = v[rows].transpose(0, 1)
        p = inputs.n_prefill_rows
        if p < k.shape[0]:
            pos = inputs.positions[p:]  # [n_dec]
            # Two advanced indices around a slice: the indexed view is [n_dec, Hkv, D].
            k_cache[inputs.decode_slots, :, pos] = k[p:]
            v_cache[inputs.decode_slots, :, pos] = v[p:]

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        inputs: StepInputs,
        scale: float,
        window: int | None = None,
    ) -> Tensor:
        """Causal attention of every row over its own sequence, after `write_kv`.

        q: [T, heads, D], k, v: [T, kv_heads, D] (this step's rows) -> [T, heads, D]. Prefill
        sequences attend over their own fresh rows, or, with an offset (a prefix from the
        prefix cache), over their slot's keys 0..offset+n-1 with the causal mask shifted by the
        offset; decode rows over their sequence's cached prefix, batched with a length mask.
        GQA via SDPA.
        `window` (sliding-window layers): the query at position i sees only keys j with
        i - window < j <= i, its last `window` positions, as transformers' sliding mask."""
        out = torch.empty_like(q)  # [T, H, D]; every row is written below
        for slot, start, n, offset in inputs.prefill:
            rows = slice(start, start + n)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [n, H, D] -> [1, H, n, D]
            if offset:
                o = self._attend_after_prefix(layer, qs, slot, offset, scale, window, inputs)
                out[rows] = o[0].transpose(0, 1)  # [1, H, n, D] -> [n, H, D]
                continue
            ks = k[rows].transpose(0, 1).unsqueeze(0)  # [n, Hkv, D] -> [1, Hkv, n, D]
            vs = v[rows].transpose(0, 1).unsqueeze(0)
            if window is None or n <= window:
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
                )
            else:
                ahead = torch.arange(n, device=q.device)
                ahead = ahead[:, None] - ahead[None, :]  # [n, n]: query pos - key pos
                band = (ahead >= 0) & (ahead < window)  # [n, n], broadcast over batch and heads
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=band, scale=scale, enable_gqa=True
                )
            out[rows] = o[0].transpose(0, 1)  # [1, H, n, D] -> [n, H, D]
        p = inputs.n_prefill_rows
        if p < q.shape[0]:
            length = inputs.decode_max_len
            # With a window, no decode row sees a key before `first_key`: skip reading them.
            first_key = 0 if window is None else max(0, inputs.decode_min_len - window)
            keys = slice(first_key, length)  # L = length - first_key positions
            k_cache, v_cache = self.kv.layer(layer)  # [S, Hkv, max_len, D]
            if inputs.decode_range is not None:
                first, end = inputs.decode_range
                kd, vd = k_cache[first:end, :, keys], v_cache[first:end, :, keys]  # views
            else:
                kd = k_cache[:, :, keys].index_select(0, inputs.decode_slots)  # [n, Hkv, L, D]
                vd = v_cache[:, :, keys].index_select(0, inputs.decode_slots)
            # Rows of one length (a single row always) see every key read: no mask is built.
            mask = None
            if inputs.decode_min_len != length:
                lens = inputs.positions[p:, None] + 1  # [n_dec, 1]: context incl. this token
                key_pos = torch.arange(first_key, length, device=q.device)  # [L]
                mask = key_pos < lens  # [n_dec, L]
                if window is not None:
                    mask &= key_pos >= lens - window
            if q.dtype == torch.float32 and q.shape[0] - p >= GROUPED_MIN_ROWS:
                o = grouped_decode_attention(q[p:], kd, vd, mask, scale)  # [n_dec, H, D]
            else:
                o = sdpa_decode_attention(q[p:], kd, vd, mask, scale)  # [n_dec, H, D]
            if p == 0:
                return o  # a decode-only step: every row is here, no copy into `out`
            out[p:] = o
        return out

    def _attend_after_prefix(
        self,
        layer: int,
        qs: Tensor,
        slot: int,
        offset: int,
        scale: float,
        window: int | None,
        inputs: StepInputs,
    ) -> Tensor:
        """A prefill's n queries at positions offset..offset+n-1 (qs [1, H, n, D]) over its
        slot's keys, read after write_kv: query i sees key j when j <= i (and i - j < window
        on sliding layers). -> [1, H, n, D]."""
        n = qs.shape[2]
        end = offset + n
        # With a window, no query sees a key before `first`: skip reading them.
        first = 0 if window is None else max(0, offset - window + 1)
        k_cache, v_cache = self.kv.layer(layer)  # [S, Hkv, max_len, D]
        ks = k_cache[slot, :, first:end].unsqueeze(0)  # [Hkv, L, D] -> [1, Hkv, L, D]
        vs = v_cache[slot, :, first:end].unsqueeze(0)
        mask = inputs.prefix_masks.get((offset, n, window))
        if mask is None:
            query_pos = torch.arange(offset, end, device=qs.device)  # [n]
            key_pos = torch.arange(first, end, device=qs.device)  # [L]
            ahead = query_pos[:, None] - key_pos[None, :]  # [n, L]: query pos - key pos
            mask = ahead >= 0 if window is None else (ahead >= 0) & (ahead < window)
            inputs.prefix_masks[(offset, n, window)] = mask
        return F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
        )


def owns_storage(weight: Tensor) -> bool:
    """Whether `weight` is all of its storage (not a view into a larger tensor, such as a part
    of a fused projection's weight)."""
    return weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def sdpa_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """One query per row over its own keys by SDPA, the G = H / Hkv query heads that share a
    KV head taken as that head's G query positions (no KV repeat, no causal mask: each sees
    every key it is given).

    q: [n, H, D]; k, v: [n, Hkv, L, D] (any strides, e.g. views of the cache); mask: [n, L]
    bool (True = attend; each row has at least one) or None = every key. -> [n, H, D] in q's
    dtype; query head h reads KV head h // G, as SDPA's enable_gqa. Equals SDPA over [n, H, 1,
    D] to float rounding (tests/serve/runners/test_attention.py)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(n, kv_heads, heads // kv_heads, dim)  # [n, H, D] -> [n, Hkv, G, D]
    if mask is not None:
        mask = mask[:, None, None, :]  # [n, L] -> [n, 1, 1, L]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [n, Hkv, G, D]
    return o.reshape(n, heads, dim)  # [n, Hkv, G, D] -> [n, H, D]


def grouped_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """One query per row over its own keys, GQA by grouping the query heads (no KV repeat).

    q: [n, H, D]; k, v: [n, Hkv, L, D] (any strides, e.g. views of the cache); mask: [n, L]
    bool, True = attend (each row has at least one), or None = every key. H = Hkv * G; query
    head h reads KV head h // G, as SDPA's enable_gqa. -> [n, H, D] in q's dtype. The products
    run in q's dtype, the masking and softmax in float32. Equals SDPA to float rounding
    (tests/serve/runners/test_attention.py)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(n, kv_heads, heads // kv_heads, dim)  # [n, H, D] -> [n, Hkv, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float()  # [n, Hkv, G, L]
    scores.mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)  # [n, Hkv, G, L]
    return torch.matmul(weights, v).view(n, heads, dim)  # [n, Hkv, G, D] -> [n, H, D]


def _row_mixture(rows, seq: Sequence) -> RowMixture:
    """A mixture request's rows: fixed weights, or its gate's per-row weights (MoLE)."""
    gate = seq.mixture.gate
    return RowMixture(rows, seq.mix_slots, None if gate else seq.mixture.weights, gate=gate)
