"""Benchmark: the stacked multi-adapter op vs the base layers alone and PEFT's mixed batch.

On the real model's linears (the first `layers` decoder layers, all 7 linears each), for decode
(`decode_rows` rows, one token each) and prefill (`prefill_shape` = sequences x tokens), with K
resident adapters spread over the rows (row or sequence i uses adapter i mod K, so at most
min(K, sequences) are distinct in a batch). Per case: rows/s of base + delta through
MultiLoRALinear, relative to the base layers alone and to PEFT's `Linear(x, adapter_names=...)`
holding the same K adapters, timed side by side (interleaved; median of `repeats`). For K >= 2,
a record with 2 adapters per row (row or sequence i mixes adapters i and i+1 mod K, weights
0.5 each, as the engine passes one mixture per decode row or prefill sequence) gives the cost
of a mixture row next to a single-adapter row (`vs_single`, timed in the same interleave).
For K >= 3, MoLE records (3 experts per row, weights from per-layer gates per token, gate on
the experts' outputs or on the layer input) give the cost of a MoLE row the same way.
Per method (`methods`: DoRA, Bone, Bat and a mixed batch cycling LoRA/DoRA/Bone/Bat), records
with every row's adapter of that method, `vs_lora` timed in the same interleave
(bench/multilora_methods.py).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lorafleet.bench import print_table, write_json
from lorafleet.errors import LorafleetError

DEFAULT_ADAPTERS = (1, 4, 16, 64)


def _layer_index(name: str) -> int | None:
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def _median_seconds(fns: dict, repeats: int, target_s: float = 0.1) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved so drift on a busy machine hits all."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm up (allocator, plans, lazy init)
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(target_s / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            times[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _peft_layers(linears: list[nn.Linear], stacks, k: int, rank: int) -> list[nn.Module]:
    """PEFT LoRA Linear layers over the same base linears, holding the same K adapters."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=rank, lora_alpha=2 * rank)
    layers = []
    for linear, (A, Bt) in zip(linears, stacks, strict=True):
        layer = LoraLinear(linear, "a1", config=config, r=rank, lora_alpha=2 * rank)
        for s in range(2, k + 1):
            layer.update_layer(f"a{s}", rank, lora_alpha=2 * rank, config=config)
        with torch.no_grad():
            for s in range(1, k + 1):
                layer.lora_A[f"a{s}"].weight.copy_(A[s])
                layer.lora_B[f"a{s}"].weight.copy_(Bt[s].T)
        layers.append(layer.eval())
    return layers


def _mixtures(slots: list[int], k: int) -> list:
    """Unit i (a decode row, or a prefill sequence) mixes its slot and the next one (mod K)."""
    from lorafleet.layers import RowMixture

    return [RowMixture((i,), (s, s % k + 1), (0.5, 0.5)) for i, s in enumerate(slots)]


def _moles(ours, slots: list[int], k: int) -> dict:
    """MoLE rows: unit i gates its slot and the next two (mod K), per gate variant."""
    from lorafleet.layers import RowMixture
    from lorafleet.layers.mole import MoleGates

    shapes = {m.name: (m.base_layer.in_features, m.base_layer.out_features) for m in ours}
    out = {}
    for variant in ("outputs", "input"):
        gates = MoleGates(shapes, 3, variant=variant).eval()
        out[f"mole_{variant}"] = [
            RowMixture((i,), (s, s % k + 1, (s + 1) % k + 1), gate=gates)
            for i, s in enumerate(slots)
        ]
    return out


def _timed_fns(linears, ours, peft, context, xs, slots, k) -> dict:
    names = [f"a{s}" for s in slots]

    def base():
        for lin in linears:
            lin(xs[lin.in_features])

    def multi(path=None):
        context.path = path
        context.set_slots(slots)  # once per forward: the plan is rebuilt, and timed
        for layer in ours:
            layer(xs[layer.base_layer.in_features])

    def peft_mixed():
        for layer in peft:
            layer(xs[layer.in_features], adapter_names=names)

    def mixture():
        context.path = None
        context.set_slots([0] * len(slots), _mixtures(slots, k))  # rows index the units
        for layer in ours:
            layer(xs[layer.base_layer.in_features])

    fns = {
        "base": base,
        "ours": multi,
        "peft": peft_mixed,
        "segmented": lambda: multi("segmented"),
        "gathered": lambda: multi("gathered"),
    }
    if k >= 2:
        fns["mixture"] = mixture
    if k >= 3:
        for name, rows in _moles(ours, slots, k).items():

            def mole(rows=rows):
                context.path = None
                context.set_slots([0] * len(slots), rows)
                for layer in ours:
                    layer(xs[layer.base_layer.in_features])

            fns[name] = mole
    return fns


def _mixture_record(context, lead, phase: str, k: int, slots, t: dict) -> dict:
    """The 2-adapters-per-row record, relative to the base and to the single-adapter rows."""
    context.set_slots([0] * len(slots), _mixtures(slots, k))
    plan = context.mixture_plan(torch.Size(lead), torch.device("cpu"))
    return {
        "phase": phase,
        "adapters": k,
        "adapters_per_row": 2,
        "distinct_in_batch": len(set(slots) | {s % k + 1 for s in slots}),
        "path": plan.plan.path,
        "tokens_per_s": torch.Size(lead).numel() / t["mixture"],
        "vs_base": t["base"] / t["mixture"],
        "vs_single": t["ours"] / t["mixture"],
    }


@torch.inference_mode()
def run(
    base: str = "default",
    ranks: int = 16,
    adapters: list[int] = DEFAULT_ADAPTERS,
    decode_rows: int = 16,
    prefill_shape: tuple[int, int] = (16, 64),
    json_out: str | Path = "bench/results/multilora.json",
    repeats: int = 5,
    layers: int = 4,
    threads: int | None = None,
    methods: tuple[str, ...] = ("dora", "bone", "bat", "mixed"),
) -> list[dict]:
    """Time decode and prefill per K in `adapters`; print a table, write JSON
    ({"benchmark": "multilora", ..., "records": [...]}), and return the records.

    `layers`: how many decoder layers' linears to run (4 of SmolLM2 already stream from memory
    rather than cache, as a whole model does). `threads`: torch CPU threads (None = as set).
    `methods`: per-method rows (any of dora, bone, bat, mixed; empty: LoRA rows only)."""
    from lorafleet.bench.multilora_methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LorafleetError(f"unknown --method {unknown[0]!r}: use {', '.join(METHODS)}")
    if threads:
        torch.set_num_threads(threads)
    from lorafleet.bench.multilora_methods import add_method_fns, method_records
    from lorafleet.layers import MultiLoRAContext, MultiLoRALinear
    from lorafleet.linear_layers import block_linear_modules
    from lorafleet.models import load_base

    model = load_base(base).model
    named = {
        n: m
        for n, m in block_linear_modules(model).items()
        if (i := _layer_index(n)) is not None and i < layers
    }
    linears = list(named.values())
    max_k, gen = max(adapters), torch.Generator().manual_seed(0)
    # Random, non-zero weights in [S, r, d_in] / [S, r, d_out] (slot 0 = no adapter).
    stacks = []
    for lin in linears:
        d_out, d_in = lin.weight.shape
        A = torch.randn(max_k + 1, ranks, d_in, generator=gen) / d_in**0.5
        Bt = torch.randn(max_k + 1, ranks, d_out, generator=gen) / ranks**0.5
        stacks.append((A, Bt))
    context = MultiLoRAContext()
    ours = [MultiLoRALinear(lin, context, max_k, ranks, name) for name, lin in named.items()]
    for layer, (A, Bt) in zip(ours, stacks, strict=True):
        for s in range(1, max_k + 1):
            layer.set_slot(s, A[s], Bt[s].T, 2.0)

    records = []
    phases = {"decode": (decode_rows,), "prefill": tuple(prefill_shape)}
    for phase, lead in phases.items():
        xs = {d: torch.randn(*lead, d, generator=gen) for d in {lin.in_features for lin in linears}}
        tokens = torch.Size(lead).numel()
        for k in adapters:
            slots = [i % k + 1 for i in range(lead[0])]  # per row (decode) / sequence (prefill)
            peft = _peft_layers(linears, stacks, k, ranks)
            fns = _timed_fns(linears, ours, peft, context, xs, slots, k)
            if phase == "prefill":  # gathering per row at prefill only repeats what decode shows
                del fns["segmented"], fns["gathered"]
            built = add_method_fns(fns, named, stacks, methods, k, ranks, xs, slots, gen)
            t = _median_seconds(fns, repeats)
            context.path = None
            context.set_slots(slots)
            record = {
                "phase": phase,
                "adapters": k,
                "adapters_per_row": 1,
                "distinct_in_batch": len(set(slots)),
                "path": context.plan(torch.Size(lead), torch.device("cpu")).path,
                "tokens_per_s": tokens / t["ours"],
                "vs_base": t["base"] / t["ours"],
                "vs_peft": t["peft"] / t["ours"],
                "peft_vs_base": t["base"] / t["peft"],
            }
            for path in ("segmented", "gathered"):
                if path in t:
                    record[f"{path}_vs_base"] = t["base"] / t[path]
            records.append(record)
            print_table([record], list(record))
            if "mixture" in t:
                records.append(_mixture_record(context, lead, phase, k, slots, t))
                print_table([records[-1]], list(records[-1]))
            for name in (n for n in t if n.startswith("mole_")):
                records.append(
                    {
                        "phase": phase,
                        "adapters": k,
                        "adapters_per_row": 3,
                        "path": name,
                        "tokens_per_s": tokens / t[name],
                        "vs_base": t["base"] / t[name],
                        "vs_single": t["ours"] / t[name],
                    }
                )
                print_table([records[-1]], list(records[-1]))
            for record in method_records(phase, k, tokens, t, built):
                records.append(record)
                print_table([record], list(record))
            del peft, built
    context.clear()
    columns = [
        "phase",
        "adapters",
        "adapters_per_row",
        "distinct_in_batch",
        "path",
        "tokens_per_s",
        "vs_base",
        "vs_single",
        "vs_lora",
        "vs_peft",
        "peft_vs_base",
        "segmented_vs_base",
        "gathered_vs_base",
    ]
    print_table([{c: r.get(c, "-") for c in columns} for r in records], columns)
    figures = {
        "benchmark": "multilora",
        "base": base,
        "rank": ranks,
        "layers": layers,
        "linears": len(linears),
        "decode_rows": decode_rows,
        "repeats": repeats,
        "prefill_shape": list(prefill_shape),
        "methods": list(methods),
        "records": records,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return records
