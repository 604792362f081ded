"""The serving engine on a GPU (issue 30): greedy parity with transformers + PEFT, then throughput.

1. Parity: K random LoRA adapters (fixed seeds) on `--base`; B prompts, each for one adapter
   (and the base), decoded together in the engine's batches; every request's greedy tokens
   must equal transformers' `generate` through PEFT with that one adapter, on the same device,
   float32 with TF32 off. Mismatches are listed with the first differing position.
2. Throughput: `--requests` requests over the K adapters, `--new-tokens` each (EOS ignored),
   all submitted at once to the engine; against transformers + PEFT one request at a time
   (the DESIGN's baseline). tokens/s = generated tokens / wall time (loading excluded).

    python bench/gpu/engine_gpu.py                       # auto: the GPU, or "no GPU: skipped"
    python bench/gpu/engine_gpu.py --device cpu --base tiny --quick   # CPU smoke (a minute)
    bash bench/gpu/engine_gpu.sh                         # on a lent GPU machine (setup.sh first)

Exit 0: parity held (or no GPU, with the line "no GPU: skipped"); 1: a parity mismatch; 2: bad
input. Figures go to `--out` (engine_gpu.json) and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "The film was a delight from start to finish.",
    "Tell me a joke about cats and dogs please.",
    "Question: what is the capital of France? Answer:",
    "Two plus two is",
    "Once upon a time, in a land far away, there lived a",
    "Write one sentence about the sea.",
    "List three colours:",
    "The quick brown fox",
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: skip without GPU)")
    p.add_argument("--base", default="default", help="--base of lorafleet (default, tiny, dir)")
    p.add_argument("--adapters", type=int, default=4, help="K random LoRA adapters")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--parity-tokens", type=int, default=24, help="greedy tokens per request")
    p.add_argument("--requests", type=int, default=64, help="throughput: requests")
    p.add_argument("--new-tokens", type=int, default=64, help="throughput: tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=64, help="throughput: prompt length")
    p.add_argument("--baseline-requests", type=int, default=8, help="HF+PEFT: requests timed")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/engine_gpu")))
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.parity_tokens, args.requests = 2, 8, 8
        args.new_tokens, args.prompt_tokens, args.baseline_requests = 8, 16, 2
    return args


def pick_device(name: str):
    """The device to run on, or None (auto without a GPU, or cuda without one: skipped)."""
    import torch

    from lorafleet.models import check_device, resolve_device

    name = check_device(name)
    if name != "cpu" and not torch.cuda.is_available():
        return None
    return resolve_device(name)


def load(base: str, device):
    from lorafleet.models import load_base

    return load_base(base, dtype="float32", device=device)


def hf_generate(model, tokenizer, ids: list[int], new_tokens: int, exact: bool) -> list[int]:
    """transformers' greedy generate, new tokens only; `exact`: exactly `new_tokens` (no EOS)."""
    import torch

    x = torch.tensor([ids], device=model.device)
    kw = {"min_new_tokens": new_tokens} if exact else {}
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )
    return out[0, x.shape[1] :].tolist()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(args, device, adapters) -> dict:
    """Engine greedy tokens vs transformers + PEFT per (prompt, adapter)."""
    import torch

    from lorafleet.adapters import attach
    from lorafleet.serve import Engine, SamplingParams

    engine_base = load(args.base, device)
    tok = engine_base.tokenizer
    engine = Engine(
        engine_base, max_slots=len(adapters), max_rank=args.rank, max_batch_size=len(PROMPTS)
    )
    names = [f"a{i}" for i in range(len(adapters))]
    for name, adapter in zip(names, adapters, strict=True):
        engine.load_adapter(name, adapter)
    plan = [
        (tok(p)["input_ids"], ([None] + names)[i % (len(names) + 1)]) for i, p in enumerate(PROMPTS)
    ]
    params = SamplingParams(max_tokens=args.parity_tokens)
    outs = engine.generate([(ids, name, params) for ids, name in plan])
    engine.close()
    del engine, engine_base
    mismatches, refs = [], {}
    for (ids, name), out in zip(plan, outs, strict=True):
        if name not in refs:
            model = load(args.base, device).model
            refs[name] = model if name is None else attach(model, adapters[names.index(name)])
        want = hf_generate(refs[name], tok, ids, args.parity_tokens, exact=False)
        got = list(out.token_ids)
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None
            )
            first = min(len(got), len(want)) if first is None else first
            mismatches.append({"adapter": name, "first_diff": first, "engine": got, "hf": want})
    refs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"requests": len(plan), "matched": len(plan) - len(mismatches), "mismatches": mismatches}


def throughput(args, device, adapters) -> dict:
    """Engine (all requests at once) vs HF + PEFT (one at a time), tokens/s of generation."""
    import torch

    from lorafleet.adapters import attach
    from lorafleet.serve import Engine, SamplingParams

    loaded = load(args.base, device)
    tok = loaded.tokenizer
    text = " ".join(PROMPTS * 8)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompts = [
        (ids[i % 7 :] + ids)[: args.prompt_tokens] for i in range(args.requests)
    ]  # distinct starts
    names = [f"a{i}" for i in range(len(adapters))]
    engine = Engine(
        loaded,
        max_slots=len(adapters),
        max_rank=args.rank,
        max_batch_size=min(args.requests, 64),
        max_batch_tokens=max(2048, args.prompt_tokens * 8),
        max_seq_len=args.prompt_tokens + args.new_tokens + 1,
    )
    for name, adapter in zip(names, adapters, strict=True):
        engine.load_adapter(name, adapter)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    reqs = [(p, names[i % len(names)], params) for i, p in enumerate(prompts)]
    engine.generate(reqs[: min(4, len(reqs))])  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    outs = engine.generate(reqs)
    sync(device)
    engine_s = time.perf_counter() - start
    engine_tokens = sum(len(o.token_ids) for o in outs)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    engine.close()
    del engine, loaded
    model = attach(load(args.base, device).model, adapters[0])
    hf_generate(model, tok, prompts[0], 2, exact=True)  # warm-up
    sync(device)
    start = time.perf_counter()
    hf_tokens = 0
    for p in prompts[: args.baseline_requests]:
        hf_tokens += len(hf_generate(model, tok, p, args.new_tokens, exact=True))
    sync(device)
    hf_s = time.perf_counter() - start
    engine_tps, hf_tps = engine_tokens / engine_s, hf_tokens / hf_s
    return {
        "requests": args.requests,
        "adapters": len(adapters),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "engine_tok_s": round(engine_tps, 1),
        "hf_peft_one_at_a_time_tok_s": round(hf_tps, 1),
        "ratio": round(engine_tps / hf_tps, 2),
        "engine_peak_bytes": peak,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        device = pick_device(args.device)
    except Exception as exc:  # a bad --device name: one line
        print(f"engine_gpu: {exc}", file=sys.stderr)
        return 2
    if device is None:
        print("no GPU: skipped (torch sees no CUDA device; --device cpu runs the CPU smoke)")
        return 0
    import torch

    from lorafleet.bench.engine import random_adapters

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 GEMMs
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"engine_gpu: base {args.base} on {device} ({name}), torch {torch.__version__}")
    start = time.perf_counter()
    cpu_base = load(args.base, "cpu")  # adapters are made on the CPU and moved by the engine
    adapters = random_adapters(cpu_base.model, args.adapters, args.rank)
    del cpu_base
    report = {"device": str(device), "device_name": name, "base": args.base}
    report["parity"] = parity(args, device, adapters)
    p = report["parity"]
    print(f"parity: {p['matched']}/{p['requests']} requests give transformers + PEFT's tokens")
    for m in p["mismatches"]:
        print(f"  MISMATCH adapter {m['adapter']}: first differing token at {m['first_diff']}")
    report["throughput"] = throughput(args, device, adapters)
    t = report["throughput"]
    print(
        f"throughput: engine {t['engine_tok_s']} tok/s ({t['requests']} requests, "
        f"{t['adapters']} adapters) vs transformers + PEFT one at a time "
        f"{t['hf_peft_one_at_a_time_tok_s']} tok/s: x{t['ratio']}"
    )
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".engine_gpu.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out / "engine_gpu.json")
    print(f"wrote {args.out / 'engine_gpu.json'}")
    return 1 if p["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
