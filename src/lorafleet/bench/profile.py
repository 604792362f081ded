"""Benchmark: where an engine step's time goes (prefill / decode attention, base matmuls, LoRA
ops, sampling, other ops, Python overhead) and the decode step's roofline (bytes it must move
over the machine's measured memory bandwidth).

The labels are `torch.profiler.record_function` wrappers installed on the engine's modules and
functions for the profiled run only and removed after it, so serving never pays for them."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from lorafleet.bench import print_table, write_json

# Top-level labels (disjoint within a step) and the attention kernels nested in "attention".
TOP = ("attention", "kv_write", "base_matmul", "lora", "sampling")
SDPA = ("prefill_attention", "decode_attention")


def _wrap(label: str, fn):
    from torch.profiler import record_function

    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def labelled(engine):
    """Install the labels on `engine` (its runner, linears, LoRA functions, sampler) and take
    them off again on exit."""
    import torch.nn.functional as F
    from torch import nn

    import lorafleet.layers.linear as linear_mod
    import lorafleet.serve.engine as engine_mod
    import lorafleet.serve.runners.base as runner_mod
    from lorafleet import kernels

    undo = []

    def patch(owner, name, fn):
        had = name in vars(owner)  # False: a method of the class, shadowed on the instance
        old = getattr(owner, name)
        setattr(owner, name, fn(old))
        undo.append((owner, name, old, had))

    for label, places in engine.forward_parts().items():  # attention, kv_write
        if label == "base_matmul":
            continue  # every plain GEMM is labelled at F.linear below (fused ones included)
        for owner, method in places:
            patch(owner, method, lambda f, label=label: _wrap(label, f))
    # The runners call F.linear directly where no row uses an adapter (and for the fused
    # q/k/v GEMM): label the function, not the nn.Linear modules; and lorafleet's GEMV, which
    # every base product goes through first (kernels.linear: an extension call, no aten op).
    patch(F, "linear", lambda f: _wrap("base_matmul", f))
    patch(kernels, "linear", lambda f: _wrap("base_matmul", f))
    sdpa = F.scaled_dot_product_attention
    inside = {"decode": False}  # within a decode kernel below: its SDPA is labelled already

    def by_shape(q, *args, **kwargs):  # decode rows attend with one query position each
        if inside["decode"]:
            return sdpa(q, *args, **kwargs)
        label = "decode_attention" if q.shape[-2] == 1 else "prefill_attention"
        return _wrap(label, sdpa)(q, *args, **kwargs)

    def decode_kernel(f):
        labelled_f = _wrap("decode_attention", f)

        def call(*args, **kwargs):
            inside["decode"] = True
            try:
                return labelled_f(*args, **kwargs)
            finally:
                inside["decode"] = False

        return call

    patch(F, "scaled_dot_product_attention", lambda f: by_shape)
    # decode rows attend through the grouped kernels (float32 batches: matmuls; else SDPA over
    # grouped query heads), not SDPA over one query position
    for name in ("grouped_decode_attention", "sdpa_decode_attention"):
        if hasattr(runner_mod, name):
            patch(runner_mod, name, decode_kernel)
    # lorafleet's decode-layer kernel (RoPE, KV write and attention in one call) is decode
    # attention; the decode stack (every layer in one call) has no parts a label can reach
    patch(kernels, "decode_attention", decode_kernel)
    for module in engine.base.model.modules():  # quantised linears: their own kernels
        if (
            not isinstance(module, nn.Linear)
            and type(module).__name__.endswith("Linear")
            and not hasattr(module, "base_layer")
        ):
            patch(module, "forward", lambda f: _wrap("base_matmul", f))
    for name in ("add_lora_segmented_", "add_lora_gathered_", "add_mixture_"):
        if hasattr(linear_mod, name):
            patch(linear_mod, name, lambda f: _wrap("lora", f))
    if engine.handle is not None:
        patch(engine.handle.context, "plan", lambda f: _wrap("lora", f))
    for name in ("sample", "sampled_logprobs"):
        patch(engine_mod, name, lambda f: _wrap("sampling", f))
    try:
        yield
    finally:
        for owner, name, old, had in reversed(undo):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)


def split(events, step_label: str) -> dict[str, float]:
    """Microseconds per category summed over the `step_label` events: time inside aten ops
    under each label (kernels), `other_ops` (aten ops outside every label: norms, RoPE,
    embeddings, residual adds) and `python_overhead` (step time not inside any aten op: Python,
    module calls, the profiler's own cost), plus `step` itself; the parts add up to `step`.
    `base_matmul` and `decode_attention` count their labels' whole time: lorafleet's GEMV and
    decode-layer kernel are not aten ops."""
    out = dict.fromkeys(("step", *TOP, *SDPA, "other_ops", "python_overhead"), 0.0)
    for ev in events:
        if ev.name == step_label:
            out["step"] += ev.cpu_time_total
            aten = _aten_time(ev)
            out["python_overhead"] += ev.cpu_time_total - aten
            out["other_ops"] += aten
        elif (ev.name in TOP or ev.name in SDPA) and _under(ev, step_label):
            if _under(ev, ev.name):
                continue  # a label inside the same label (kernels.linear -> F.linear): once
            aten = _aten_time(ev)
            out[ev.name] += aten
            if ev.name in TOP:
                out["other_ops"] -= aten
            if ev.name in ("base_matmul", "decode_attention"):  # lorafleet's kernels run
                # outside aten ops: count their whole time (decode attention's in its parent,
                # attention, too, so the top-level parts still add up to the step)
                extra = ev.cpu_time_total - aten
                out[ev.name] += extra
                if ev.name == "decode_attention":
                    out["attention"] += extra
                out["python_overhead"] -= extra
    out["attention_glue"] = out["attention"] - out["prefill_attention"] - out["decode_attention"]
    return out


def ops_per_step(events, step_label: str, steps: int) -> dict[str, float]:
    """Outermost aten ops (those not called by another aten op) per `step_label` step: "ops"
    in all and per op name."""
    counts: dict[str, float] = {"ops": 0.0, "aten::linear": 0.0}
    for ev in events:
        if not ev.name.startswith("aten::") or not _under(ev, step_label):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts["ops"] += 1 / steps
            counts[ev.name] = counts.get(ev.name, 0.0) + 1 / steps
    return counts


def _aten_time(ev) -> float:
    """Time in the outermost aten ops under `ev`."""
    total, stack = 0.0, list(ev.cpu_children)
    while stack:
        child = stack.pop()
        if child.name.startswith("aten::"):
            total += child.cpu_time_total
        else:
            stack.extend(child.cpu_children)
    return total


def _under(ev, label: str) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


def decode_bytes(engine, rows: int, context: int, distinct: int) -> dict[str, int]:
    """Bytes one decode step must read at least: the weights (parameters and other non-slot
    buffers, each storage once; an untied input embedding only reads its B rows, so it is
    left out), the KV cache of `rows` sequences of `context` positions, and `distinct`
    resident adapters' A and B in the slots' dtype."""
    model = engine.base.model
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen, weights = set(), 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if "lora_" in name or name.endswith(".scale") or t.data_ptr() in seen:
            continue
        if t.data_ptr() == embed.data_ptr() and not tied:
            continue
        seen.add(t.data_ptr())
        weights += t.numel() * t.element_size()
    k_cache, _ = engine.kv.layer(0)  # [S, Hkv, max_len, D]
    layers = len(model.model.layers)
    kv = 2 * layers * rows * context * k_cache.shape[1] * k_cache.shape[3] * k_cache.element_size()
    adapter = 0
    if engine.handle is not None:
        for layer in engine.handle.layers.values():
            r = max(layer.ranks) if layer.ranks else 0
            d = layer.lora_A.shape[2] + layer.lora_Bt.shape[2]
            adapter += distinct * r * d * layer.lora_A.element_size()
    return {"weights": weights, "kv": kv, "adapters": adapter, "total": weights + kv + adapter}


def _workload(cfg: dict):
    from lorafleet.bench.engine import gsm8k_prompts, random_adapters
    from lorafleet.bench.settings import parse_setting
    from lorafleet.models import load_base
    from lorafleet.serve.engine import Engine
    from lorafleet.serve.sequence import SamplingParams

    dtype, quantize = parse_setting(cfg.get("setting", "float32"))
    loaded = load_base(cfg["base"], dtype=dtype)
    loaded.model.eval()
    n, p, new = cfg["requests"], cfg["prompt_tokens"], cfg["new_tokens"]
    prompts = gsm8k_prompts(loaded.tokenizer, n, p)
    made = random_adapters(loaded.model, cfg["adapters"], cfg["rank"])
    engine = Engine(
        loaded,
        max_slots=max(1, len(made)),
        max_rank=cfg["rank"],
        max_batch_size=n,
        max_batch_tokens=max(n * p, p + 1),
        max_seq_len=p + new + 8,
        quantize=quantize,
    )
    names = [f"a{i}" for i in range(len(made))]
    for name, adapter in zip(names, made, strict=True):
        engine.load_adapter(name, adapter)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    reqs = [
        (ids, names[i % len(names)] if names else None, params) for i, ids in enumerate(prompts)
    ]  # adapters=0: every request on the base
    return engine, reqs


def _steps(engine, reqs, label_steps: bool) -> list[float]:
    """Run `reqs` to the end one step at a time; seconds per step (the first one prefills)."""
    from torch.profiler import record_function

    for r in reqs:
        engine.add_request(*r)
    times = []
    while engine.has_unfinished():
        label = "step:prefill" if not times else "step:decode"
        start = time.perf_counter()
        with record_function(label) if label_steps else contextlib.nullcontext():
            engine.step()
        times.append(time.perf_counter() - start)
    return times


def run(
    base: str = "default",
    requests: int = 32,
    adapters: int = 16,
    prompt_tokens: int = 100,
    new_tokens: int = 16,
    rank: int = 16,
    stream_mb: int = 256,
    json_out: str | Path = "bench/results/profile.json",
    setting: str = "float32",
) -> dict:
    """Profile one run of `requests` (request i uses adapter i % k; adapters=0: all on the base;
    requests=1: the single-row decode step) in `setting` (float32, bfloat16, bfloat16+int8, ...)
    and print the split of the prefill step and of the mean decode step, the torch ops per
    decode step, then the decode roofline."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lorafleet.bench.stream import measure

    cfg = {
        "base": base,
        "setting": setting,
        "requests": requests,
        "adapters": adapters,
        "rank": rank,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }
    engine, reqs = _workload(cfg)
    _steps(engine, reqs[:2], False)  # warm-up
    plain = _steps(engine, reqs, False)  # unprofiled step times
    with labelled(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
        _steps(engine, reqs, True)
    events = prof.events()
    decode_steps = max(1, len(plain) - 1)
    pre, dec = split(events, "step:prefill"), split(events, "step:decode")
    rows = [
        {
            "part": k,
            "prefill_ms": pre[k] / 1e3,
            "decode_ms": dec[k] / 1e3 / decode_steps,
            "decode_share": dec[k] / dec["step"] if dec["step"] else None,
        }
        for k in (
            *SDPA,
            "attention_glue",
            "kv_write",
            "base_matmul",
            "lora",
            "sampling",
            "other_ops",
            "python_overhead",
            "step",
        )
    ]
    print_table(rows, ["part", "prefill_ms", "decode_ms", "decode_share"])
    ops = ops_per_step(events, "step:decode", decode_steps)
    layers = len(engine.base.model.model.layers)
    print(
        f"decode step: {ops['ops']:.0f} torch ops ({ops['ops'] / layers:.1f} per layer over "
        f"{layers} layers), of them {ops['aten::linear']:.0f} linear calls"
    )
    decode_ms = 1e3 * sorted(plain[1:])[len(plain[1:]) // 2] if len(plain) > 1 else None
    bw = measure(stream_mb, 3, torch.get_num_threads())
    moved = decode_bytes(engine, requests, prompt_tokens + new_tokens // 2, adapters)
    floor_ms = moved["total"] / (max(bw.values()) * 1e9) * 1e3
    print(
        f"decode step: {moved['total'] / 1e6:.1f} MB moved (weights {moved['weights'] / 1e6:.1f}"
        f", KV {moved['kv'] / 1e6:.1f}, adapters {moved['adapters'] / 1e6:.1f}); bandwidth "
        f"{max(bw.values()):.1f} GB/s -> floor {floor_ms:.2f} ms; measured "
        f"{decode_ms:.2f} ms unprofiled (floor / measured = {floor_ms / decode_ms:.2f})"
    )
    figures = {
        "benchmark": "profile",
        **cfg,
        "rows": rows,
        "ops_per_decode_step": ops,
        "prefill_step_ms": plain[0] * 1e3,
        "decode_step_ms_p50": decode_ms,
        "bytes_per_decode_step": moved,
        "stream_gb_s": bw,
        "roofline_floor_ms": floor_ms,
        "roofline_fraction": floor_ms / decode_ms if decode_ms else None,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
