"""`bench multilora`'s per-method rows: DoRA, Bone and Bat slots served by the batched op.

Each method gets its own set of MultiLoRALinear layers over the same base linears, with K
random adapters of that method in slots 1..K (entries built by the method's module in
adapters/methods/, as the engine builds them from a saved adapter), plus a "mixed" set whose
slot s holds LoRA, DoRA, Bone, Bat in turn. Timed in the same interleave as the LoRA rows, so
`vs_lora` compares like with like. Bat holds a dense d_out x d_in delta per linear per adapter,
so its records stop at BAT_MAX_ADAPTERS (the memory that cost is, per adapter, is in the record).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MIXED_CYCLE = ("lora", "dora", "bone", "bat")
METHODS = ("dora", "bone", "bat", "mixed")
BAT_MAX_ADAPTERS = 4
METHOD_MAX_ADAPTERS = 16


def entry(method: str, W: Tensor, rank: int, A: Tensor, Bt: Tensor, gen: torch.Generator):
    """One random adapter of `method` for the linear of weight W, as a SlotEntry built by the
    method's own `serve` (adapters/methods/), as the engine builds it from a saved adapter."""
    from lorafleet.adapters.methods import ModuleWeights, get_method

    d_out, d_in = W.shape
    config = {"r": rank, "lora_alpha": 2.0 * rank}  # LoRA's scale 2
    parts = {"A": A, "B": Bt.T}
    if method == "dora":
        norm = torch.linalg.norm(W + 2.0 * (Bt.T @ A), dim=1)
        parts["lora_magnitude_vector"] = norm * (1 + 0.05 * torch.randn(d_out, generator=gen))
    elif method == "bone":
        parts = {"miss_block": torch.randn(rank, d_out, generator=gen) * 0.01}
    elif method == "bat":
        parts = {"miss_block": torch.randn(d_out // rank, rank, rank, generator=gen) * 0.01}
    elif method != "lora":
        raise ValueError(f"unknown method {method!r}")
    return get_method(method).serve(ModuleWeights("bench", config, parts, {}, W, rank))


def supported(method: str, k: int, linears: list[nn.Linear], rank: int) -> bool:
    """Whether `method` gets a record at K adapters (Bat: rank divides every dim, K capped)."""
    if k > METHOD_MAX_ADAPTERS:
        return False
    has_bat = method == "bat" or (method == "mixed" and k >= MIXED_CYCLE.index("bat") + 1)
    if not has_bat:
        return True
    bat_slots = k if method == "bat" else k // len(MIXED_CYCLE)
    dims_ok = all(d % rank == 0 for lin in linears for d in lin.weight.shape)
    return dims_ok and bat_slots <= BAT_MAX_ADAPTERS


def method_layers(
    named: dict[str, nn.Linear], stacks, method: str, k: int, rank: int, gen: torch.Generator
) -> tuple[object, list[nn.Module]]:
    """A context and MultiLoRALinear layers whose slots 1..K hold `method`'s adapters."""
    from lorafleet.layers import MultiLoRAContext, MultiLoRALinear

    context = MultiLoRAContext()
    layers = []
    for (name, lin), (A, Bt) in zip(named.items(), stacks, strict=True):
        layer = MultiLoRALinear(lin, context, k, rank, name)
        for s in range(1, k + 1):
            kind = MIXED_CYCLE[(s - 1) % len(MIXED_CYCLE)] if method == "mixed" else method
            layer.load_entry(s, entry(kind, lin.weight, rank, A[s], Bt[s], gen))
        layers.append(layer)
    return context, layers


def timed_fn(context, layers, xs: dict, slots: list[int]):
    """One forward of the method's layers over the batch (the plan rebuilt, as per forward)."""

    def fn():
        context.path = None
        context.set_slots(slots)
        for layer in layers:
            layer(xs[layer.base_layer.in_features])

    return fn


def add_method_fns(fns: dict, named, stacks, methods, k: int, rank: int, xs, slots, gen) -> dict:
    """Add `method_<m>` timings for every supported method at K adapters; return the layers."""
    built = {}
    for m in methods:
        if supported(m, k, list(named.values()), rank):
            context, layers = method_layers(named, stacks, m, k, rank, gen)
            fns[f"method_{m}"] = timed_fn(context, layers, xs, slots)
            built[m] = layers
    return built


def method_records(phase: str, k: int, tokens: int, t: dict, built: dict) -> list[dict]:
    """Records next to LoRA's: tokens/s, vs the base layers and vs LoRA rows (same interleave)."""
    records = []
    for m, layers in built.items():
        name = f"method_{m}"
        extra_mib = (
            sum(d.numel() * d.element_size() for layer in layers for d in layer.dense.values())
            / 2**20
            / k
        )
        records.append(
            {
                "phase": phase,
                "adapters": k,
                "adapters_per_row": 1,
                "path": m,
                "tokens_per_s": tokens / t[name],
                "vs_base": t["base"] / t[name],
                "vs_lora": t["ours"] / t[name],
                "dense_mib_per_adapter": round(extra_mib, 1),
            }
        )
    return records
