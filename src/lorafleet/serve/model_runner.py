"""The engine's own forward over a transformers model's weights: packed rows, KV cache, SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet.errors import LorafleetError
from lorafleet.layers import MultiLoRAContext
from lorafleet.serve.kv_cache import KVCache
from lorafleet.serve.sequence import Sequence


@dataclass
class StepInputs:
    """One forward's rows: prefill sequences' prompts packed back to back (no padding), then
    one row per decoding sequence. T = prefill tokens + decoding sequences, B = sequences."""

    input_ids: Tensor  # [T] long
    positions: Tensor  # [T] long, each row's position in its own sequence
    row_slots: Tensor  # [T] long, each row's adapter slot (0 = base) for MultiLoRAContext
    prefill: list[tuple[int, int, int]]  # (kv_slot, first row, length) per prefill sequence
    n_prefill_rows: int  # rows [0, n_prefill_rows) are prefill, the rest decode
    decode_slots: Tensor  # [n_dec] long, KV slot per decode row
    decode_range: tuple[int, int] | None  # (first, end) when decode_slots is a contiguous range
    decode_max_len: int  # longest context among decode rows (its new token included)
    last_rows: Tensor  # [B] long, the row whose logits pick each sequence's next token
    decode_min_len: int = 0  # shortest context among decode rows (bounds sliding-window reads)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Architecture-independent parts: the KV cache, packing sequences into rows, attention.

    A subclass per model family implements `forward` over its own module layout (see
    LlamaRunner, Gemma3Runner) and calls `write_kv` and `attend` per layer; `attend` takes a
    sliding window for local-attention layers."""

    model_type = ""

    def __init__(self, model: nn.Module, context: MultiLoRAContext | None, max_seqs: int,
                 max_len: int):  # fmt: skip
        self.model = model
        self.context = context
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers, kv_heads, self.head_dim = self.geometry()
        self.kv = KVCache(
            layers, max_seqs, kv_heads, max_len, self.head_dim, self.dtype, self.device
        )

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Raise a one-line LorafleetError if this runner cannot serve `model`'s config."""

    def geometry(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) for the KV cache."""
        raise NotImplementedError

    def forward(self, inputs: StepInputs) -> Tensor:
        raise NotImplementedError

    def build(self, prefill: list[Sequence], decode: list[Sequence]) -> StepInputs:
        """Pack a step's sequences into rows (prefill prompts from position 0, then decodes)."""
        ids, positions, slots, segments, last = [], [], [], [], []
        for seq in prefill:
            start, n = len(ids), len(seq.prompt_ids)
            ids += seq.prompt_ids
            positions += range(n)
            slots += [seq.lora_slot] * n
            segments.append((seq.kv_slot, start, n))
            last.append(start + n - 1)
        n_prefill = len(ids)
        for seq in decode:
            # The last sampled token is not in the cache yet: it is this step's input.
            last.append(len(ids))
            ids.append(seq.last_token)
            positions.append(seq.num_cached)
            slots.append(seq.lora_slot)
        kv_slots = [seq.kv_slot for seq in decode]
        first = kv_slots[0] if kv_slots else 0
        contiguous = bool(kv_slots) and kv_slots == list(range(first, first + len(kv_slots)))
        as_long = {"dtype": torch.long, "device": self.device}
        return StepInputs(
            input_ids=torch.tensor(ids, **as_long),
            positions=torch.tensor(positions, **as_long),
            row_slots=torch.tensor(slots, dtype=torch.long),  # the context moves it per device
            prefill=segments,
            n_prefill_rows=n_prefill,
            decode_slots=torch.tensor(kv_slots, **as_long),
            decode_range=(first, first + len(kv_slots)) if contiguous else None,
            decode_max_len=max((s.num_cached + 1 for s in decode), default=0),
            last_rows=torch.tensor(last, **as_long),
            decode_min_len=min((s.num_cached + 1 for s in decode), default=0),
        )

    @torch.inference_mode()
    def run(self, prefill: list[Sequence], decode: list[Sequence]) -> Tensor:
        """Logits [B, vocab] (float32) for prefill + decode sequences, in that order."""
        inputs = self.build(prefill, decode)
        if self.context is not None:
            self.context.set_slots(inputs.row_slots if inputs.row_slots.any() else None)
        try:
            return self.forward(inputs)
        finally:
            if self.context is not None:
                self.context.clear()

    def write_kv(self, layer: int, k: Tensor, v: Tensor, inputs: StepInputs) -> None:
        """Store this step's keys and values (k, v: [T, kv_heads, head_dim]) in the cache."""
        k_cache, v_cache = self.kv.layer(layer)  # [S, kv_heads, max_len, head_dim] each
        for slot, start, n in inputs.prefill:
            rows = slice(start, start + n)
            k_cache[slot, :, :n] = k[rows].transpose(0, 1)  # [n, Hkv, D] -> [Hkv, n, D]
            v_cache[slot, :, :n] = v[rows].transpose(0, 1)
        p = inputs.n_prefill_rows
        if p < k.shape[0]:
            pos = inputs.positions[p:]  # [n_dec]
            # Two advanced indices around a slice: the indexed view is [n_dec, Hkv, D].
            k_cache[inputs.decode_slots, :, pos] = k[p:]
            v_cache[inputs.decode_slots, :, pos] = v[p:]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, inputs: StepInputs,
               scale: float, window: int | None = None) -> Tensor:  # fmt: skip
        """Causal attention of every row over its own sequence, after `write_kv`.

        q: [T, heads, D], k, v: [T, kv_heads, D] (this step's rows) -> [T, heads, D]. Prefill
        sequences attend over their own fresh rows (nothing is cached before them); decode rows
        over their sequence's cached prefix, batched with a length mask. GQA via SDPA.
        `window` (sliding-window layers): the query at position i sees only keys j with
        i - window < j <= i, its last `window` positions, as transformers' sliding mask."""
        out = torch.empty_like(q)  # [T, H, D]; every row is written below
        for _, start, n in inputs.prefill:
            rows = slice(start, start + n)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [n, H, D] -> [1, H, n, D]
            ks = k[rows].transpose(0, 1).unsqueeze(0)  # [n, Hkv, D] -> [1, Hkv, n, D]
            vs = v[rows].transpose(0, 1).unsqueeze(0)
            if window is None or n <= window:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                   enable_gqa=True)  # fmt: skip
            else:
                ahead = torch.arange(n, device=q.device)
                ahead = ahead[:, None] - ahead[None, :]  # [n, n]: query pos - key pos
                band = (ahead >= 0) & (ahead < window)  # [n, n], broadcast over batch and heads
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=scale,
                                                   enable_gqa=True)  # fmt: skip
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
            lens = inputs.positions[p:, None] + 1  # [n_dec, 1]: context incl. this step's token
            key_pos = torch.arange(first_key, length, device=q.device)  # [L]
            mask = key_pos < lens  # [n_dec, L]
            if window is not None:
                mask &= key_pos >= lens - window
            qd = q[p:].unsqueeze(2)  # [n_dec, H, D] -> [n_dec, H, 1, D]
            mask = mask[:, None, None, :]  # [n_dec, L] -> [n_dec, 1, 1, L], over heads and query
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                               scale=scale, enable_gqa=True)  # fmt: skip
            out[p:] = o.squeeze(2)  # [n_dec, H, 1, D] -> [n_dec, H, D]
        return out


class LlamaRunner(ModelRunner):
    """LlamaForCausalLM (SmolLM2, Llama 2/3): RMSNorm, RoPE from the model's own rotary module
    (so rope scaling variants match transformers), GQA attention, SwiGLU MLP, tied or untied
    head. The q/k/v/o and MLP linears are called as modules, so MultiLoRA layers apply."""

    model_type = "llama"

    def geometry(self) -> tuple[int, int, int]:
        config = self.model.config
        head_dim = getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers, config.num_key_value_heads, head_dim

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
            q = attn.q_proj(x).view(x.shape[0], -1, head_dim)  # [T, H*D] -> [T, H, D]
            k = attn.k_proj(x).view(x.shape[0], -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
            v = attn.v_proj(x).view(x.shape[0], -1, head_dim)  # [T, Hkv*D] -> [T, Hkv, D]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.write_kv(index, k, v, inputs)
            o = self.attend(index, q, k, v, inputs, attn.scaling)  # [T, H, D]
            h = h + attn.o_proj(o.reshape(x.shape[0], -1))  # [T, H, D] -> [T, H*D] -> [T, d]
            h = h + layer.mlp(layer.post_attention_layernorm(h))  # [T, d]
        last = body.norm(h.index_select(0, inputs.last_rows))  # [B, d]
        return self.model.lm_head(last).float()  # [B, vocab]


# Other families live in their own modules and subclass ModelRunner (defined above).
from lorafleet.serve.gemma3_runner import Gemma3Runner  # noqa: E402

RUNNERS: dict[str, type[ModelRunner]] = {"llama": LlamaRunner, "gemma3_text": Gemma3Runner}


def runner_class(model: nn.Module) -> type[ModelRunner]:
    """The runner for `model`'s architecture, or a one-line LorafleetError (before the engine
    changes the model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = RUNNERS.get(model_type)
    if cls is None or not hasattr(getattr(model, "model", None), "layers"):
        supported = ", ".join(RUNNERS)
        raise LorafleetError(
            f"model type {model_type or type(model).__name__} is not supported by the engine "
            f"(supported: {supported})"
        )
    cls.check(model)
    return cls
