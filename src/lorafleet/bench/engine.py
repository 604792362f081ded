"""Benchmark: the serving engine's throughput on many requests for many adapters, against
transformers + PEFT one request at a time, the engine on the base only, transformers' static
batch and (when the installed transformers has it) its continuous-batching `generate_batch`.

Every variant runs in its own spawned process (so its peak RSS is its own) on the same prompts
(the engine with adapters and on the base only share one process, alternating runs, best of
`reps`, so their ratio holds under other load),
greedy, with EOS ignored so each request generates exactly `new_tokens` tokens. tokens/s is the
generated tokens over the wall time of generation only (loading excluded)."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.bench.child import run_in_child

SEED = 1234
SCALE = 0.02  # random adapter weights: large enough to change the tokens, small enough to stay sane


def gsm8k_prompts(tokenizer, requests: int, prompt_tokens: int) -> list[list[int]]:
    """`requests` prompts of exactly `prompt_tokens` ids, cut from real text (gsm8k rows)."""
    from lorafleet.data import load_examples

    need = requests * prompt_tokens
    limit = max(16, need // 40)
    while True:
        rows = load_examples("gsm8k", tokenizer, chat=False, limit=limit).examples
        text = "\n\n".join(r.prompt + r.target for r in rows)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= need or len(rows) < limit:
            break
        limit *= 2
    if len(ids) < need:  # a short data file: reuse it
        ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    return [ids[i * prompt_tokens : (i + 1) * prompt_tokens] for i in range(requests)]


def random_adapters(model, count: int, rank: int) -> list:
    """`count` LoRA adapters on every linear layer, random non-zero weights (fixed seeds)."""
    import torch

    from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter

    peft_model = new_adapter(model, MethodConfig(method="lora", rank=rank, alpha=2.0 * rank))
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(SEED + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(SCALE * torch.randn(p.shape, generator=gen))
        adapter = adapter_from_model(peft_model)
        adapter.tensors = {k: v.detach().clone() for k, v in adapter.tensors.items()}
        out.append(adapter)
    peft_model.unload()  # the base model, its linears restored
    return out


def _setup(base: str, requests: int, adapters: int, prompt_tokens: int, rank: int, need: bool):
    import torch

    from lorafleet.models import load_base

    torch.manual_seed(0)
    loaded = load_base(base)
    loaded.model.eval()
    prompts = gsm8k_prompts(loaded.tokenizer, requests, prompt_tokens)
    made = random_adapters(loaded.model, adapters, rank) if need else []
    return loaded, prompts, made


def _engine_pair(cfg: dict) -> dict:
    """The engine with adapters, on the base only, and with every request mixing two adapters
    (0.5 each, in the batched op), in one process, alternating runs (best of `reps` each): their
    ratios are then robust to other load on the machine."""
    from lorafleet.serve.engine import Engine
    from lorafleet.serve.sequence import SamplingParams

    loaded, prompts, made = _setup(
        cfg["base"], cfg["requests"], cfg["adapters"], cfg["prompt_tokens"], cfg["rank"], True
    )
    n, p, new = cfg["requests"], cfg["prompt_tokens"], cfg["new_tokens"]
    engine = Engine(
        loaded,
        max_slots=max(1, cfg["adapters"]),
        max_rank=cfg["rank"],
        max_batch_size=n,
        max_batch_tokens=max(n * p, p + 1),
        max_seq_len=p + new + 8,
    )
    names = [f"a{i}" for i in range(len(made))]
    for name, adapter in zip(names, made, strict=True):
        engine.load_adapter(name, adapter)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    engine.generate([(prompts[0][:8], names[0], SamplingParams(max_tokens=2, ignore_eos=True))])
    best, out = {}, {}
    for _ in range(cfg.get("reps", 2)):
        for kind in ("engine", "engine_all_base", "engine_mix2"):
            reqs = [(ids, _spec(kind, names, i), params) for i, ids in enumerate(prompts)]
            start = time.perf_counter()
            outs = engine.generate(reqs)
            seconds = time.perf_counter() - start
            bad = [o for o in outs if o.finish_reason == "error"]
            if bad:
                raise RuntimeError(f"engine request failed: {bad[0].error}")
            if seconds < best.get(kind, float("inf")):
                best[kind] = seconds
                out[kind] = {
                    "tokens": sum(len(o.token_ids) for o in outs),
                    "seconds": seconds,
                    "request0": list(outs[0].token_ids),
                }
    return {"pair": out}


def _spec(kind: str, names: list[str], i: int):
    """Request i's adapter: its own, none, or (engine_mix2) its own and the next at 0.5 each."""
    if kind == "engine_all_base":
        return None
    own = names[i % len(names)]
    if kind == "engine_mix2" and len(names) > 1:
        return [(own, 0.5), (names[(i + 1) % len(names)], 0.5)]
    return own


def _sequential_peft(cfg: dict) -> dict:
    import torch
    from peft import set_peft_model_state_dict

    from lorafleet.adapters import attach
    from lorafleet.adapters.methods import peft_config_from_dict

    loaded, prompts, made = _setup(
        cfg["base"], cfg["requests"], cfg["adapters"], cfg["prompt_tokens"], cfg["rank"], True
    )
    new, tok = cfg["new_tokens"], loaded.tokenizer
    names = [f"a{i}" for i in range(len(made))]
    model = attach(loaded.model, made[0], names[0])
    for name, adapter in zip(names[1:], made[1:], strict=True):
        config = peft_config_from_dict(adapter.config)
        config.inference_mode = True
        model.add_adapter(name, config)
        set_peft_model_state_dict(model, adapter.tensors, adapter_name=name)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def gen(ids, n):
        x = torch.tensor([ids])
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad,
        )
        return out[0, len(ids) :]

    with torch.inference_mode():
        model.set_adapter(names[0])
        gen(prompts[0][:8], 2)  # warmup
        tokens, first = 0, None
        start = time.perf_counter()
        for i, ids in enumerate(prompts):
            model.set_adapter(names[i % len(names)])
            out = gen(ids, new)
            tokens += len(out)
            first = out.tolist() if first is None else first
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "request0": first}


def _static_batch(cfg: dict) -> dict:
    import torch

    loaded, prompts, _ = _setup(
        cfg["base"], cfg["requests"], cfg["adapters"], cfg["prompt_tokens"], cfg["rank"], False
    )
    new, tok, model = cfg["new_tokens"], loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)  # left padding (the prompts are all one length here)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        model.generate(
            input_ids=ids[:2, :8],
            attention_mask=mask[:2, :8],
            do_sample=False,
            max_new_tokens=2,
            min_new_tokens=2,
            pad_token_id=pad,
        )  # warmup
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
        )
        seconds = time.perf_counter() - start
    gen = out[:, width:]
    return {"tokens": int(gen.numel()), "seconds": seconds, "request0": gen[0].tolist()}


def _generate_batch(cfg: dict) -> dict:
    import torch
    from transformers import GenerationConfig

    loaded, prompts, _ = _setup(
        cfg["base"], cfg["requests"], cfg["adapters"], cfg["prompt_tokens"], cfg["rank"], False
    )
    new, tok, model = cfg["new_tokens"], loaded.tokenizer, loaded.model
    if not hasattr(model, "generate_batch"):
        raise RuntimeError("the installed transformers has no model.generate_batch")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=pad
    )
    with torch.inference_mode():
        model.generate_batch([prompts[0][:8]], generation_config=config, max_new_tokens=2)
        start = time.perf_counter()
        results = model.generate_batch(prompts, generation_config=config, max_new_tokens=new)
        seconds = time.perf_counter() - start
    outs = list(results.values())
    if len(outs) != len(prompts) or any(o.error for o in outs):
        errors = [o.error for o in outs if o.error]
        raise RuntimeError(f"{len(outs)}/{len(prompts)} results; {errors[:1]}")
    tokens = sum(len(o.generated_tokens) for o in outs)
    if tokens != len(prompts) * new:
        raise RuntimeError(f"generated {tokens} tokens, expected {len(prompts) * new}")
    return {"tokens": tokens, "seconds": seconds, "request0": list(outs[0].generated_tokens)}


VARIANTS = {
    "engine_pair": _engine_pair,  # gives "engine" and "engine_all_base"
    "sequential_peft": _sequential_peft,
    "static_batch": _static_batch,
    "generate_batch": _generate_batch,
}


def run(
    base: str = "default",
    requests: int = 32,
    adapters: int = 16,
    prompt_tokens: int = 100,
    new_tokens: int = 64,
    rank: int = 16,
    json_out: str | Path = "bench/results/engine.json",
    quick: bool = False,
    limit_s: float = 1800.0,
    reps: int = 2,
    variants_to_run: tuple[str, ...] = tuple(VARIANTS),
) -> dict:
    """Run `variants_to_run` (VARIANTS' names; all by default) on `base`, print the table and
    the ratios, write the figures to `json_out` and return them."""
    if quick:
        requests, adapters, new_tokens, prompt_tokens = 8, 4, 16, 32
    cfg = {
        "base": base,
        "requests": requests,
        "adapters": adapters,
        "rank": rank,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "reps": reps,
    }
    raw, variants, reasons, rows = {}, {}, {}, []
    results = []
    for name in variants_to_run:
        print(f"running {name} ...", flush=True)
        r = run_in_child(VARIANTS[name], cfg, limit_s=limit_s)
        if "pair" in r:  # one process measured both engine variants
            results += [(k, {**v, "peak_rss_mb": r["peak_rss_mb"]}) for k, v in r["pair"].items()]
        elif name == "engine_pair":
            results += [("engine", r), ("engine_all_base", r), ("engine_mix2", r)]
        else:
            results.append((name, r))
    for name, r in results:
        raw[name] = r
        if "error" in r:
            print(f"  {name}: {r['error']}", flush=True)
            reasons[name] = r["error"]
            variants[name] = None
            rss = r.get("peak_rss_mb")  # absent when the variant was killed
            rows.append(
                {
                    "variant": name,
                    "tokens": None,
                    "seconds": None,
                    "tokens_per_s": None,
                    "peak_rss_mb": round(rss) if rss else None,
                }
            )
            continue
        variants[name] = {
            "tokens_per_s": r["tokens"] / r["seconds"],
            "seconds": r["seconds"],
            "peak_rss_mb": round(r["peak_rss_mb"]),
            "tokens": r["tokens"],
        }
        rows.append({"variant": name, **variants[name]})
        print(f"  {name}: {r['tokens']} tokens in {r['seconds']:.1f} s", flush=True)

    def tps(name):
        return variants[name]["tokens_per_s"] if variants.get(name) else None

    def ratio(a, b):
        return tps(a) / tps(b) if tps(a) and tps(b) else None

    parity = None
    engine_run, peft_run = raw.get("engine", {}), raw.get("sequential_peft", {})
    if "request0" in engine_run and "request0" in peft_run:
        parity = engine_run["request0"] == peft_run["request0"]
    figures = {
        "benchmark": "engine",
        "base": base,
        "tokens_per_s": tps("engine"),
        "vs_sequential": ratio("engine", "sequential_peft"),
        "vs_all_base": ratio("engine", "engine_all_base"),
        "mix2_vs_single": ratio("engine_mix2", "engine"),
        "all_base_vs_static_batch": ratio("engine_all_base", "static_batch"),
        "all_base_vs_generate_batch": ratio("engine_all_base", "generate_batch"),
        "peak_rss_mb": variants["engine"]["peak_rss_mb"] if variants.get("engine") else None,
        "parity_request0": parity,
        "variants": variants,
        "errors": reasons,
        "requests": requests,
        "adapters": adapters,
        "rank": rank,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }
    print_table(rows, ["variant", "tokens", "seconds", "tokens_per_s", "peak_rss_mb"])
    for key in (
        "vs_sequential",
        "vs_all_base",
        "mix2_vs_single",
        "all_base_vs_static_batch",
        "all_base_vs_generate_batch",
        "parity_request0",
    ):
        value = figures[key]
        print(f"{key} = {value:.3f}" if isinstance(value, float) else f"{key} = {value}")
    print(f"wrote {write_json(json_out, figures)}")
    return figures
