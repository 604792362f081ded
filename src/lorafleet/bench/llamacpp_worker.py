"""Single-stream greedy decode through llama.cpp's Python binding, in the peers' venv."""

# Run as `<peers venv>/bin/python llamacpp_worker.py SPEC.json`: SPEC holds model (a .gguf),
# prompts (token id lists), new_tokens, threads, n_ctx, reps. Each prompt is decoded alone,
# greedy, EOS ignored, from an empty KV cache; the best of `reps` passes (by wall time) is
# printed as one JSON line: per-request records {ttft, tokens, last} (seconds from that
# request's start), the pass's seconds, request 0's tokens and this process's peak RSS.

from __future__ import annotations

import json
import resource
import sys
import time


def decode(llm, ids: list[int], new_tokens: int) -> tuple[dict, list[int]]:
    """One request from an empty cache: greedy, exactly `new_tokens` tokens (EOS ignored)."""
    llm.reset()
    rec = {"ttft": None, "tokens": 0, "last": None}
    out: list[int] = []
    start = time.perf_counter()
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=False):
        now = time.perf_counter() - start
        rec["ttft"] = now if rec["ttft"] is None else rec["ttft"]
        rec["last"] = now
        rec["tokens"] += 1
        out.append(int(token))
        if rec["tokens"] >= new_tokens:
            break
    return rec, out


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from llama_cpp import Llama

    llm = Llama(
        model_path=spec["model"],
        n_ctx=spec["n_ctx"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        n_batch=512,
        seed=0,
        verbose=False,
    )
    decode(llm, spec["prompts"][0][:8], 2)  # warmup
    best = None
    for _ in range(spec.get("reps", 1)):
        began = time.perf_counter()
        runs = [decode(llm, ids, spec["new_tokens"]) for ids in spec["prompts"]]
        seconds = time.perf_counter() - began
        if best is None or seconds < best["seconds"]:
            best = {"records": [r for r, _ in runs], "seconds": seconds, "request0": runs[0][1]}
    best["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(best))


if __name__ == "__main__":
    main(sys.argv[1])
