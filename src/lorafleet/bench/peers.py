"""Benchmark: lorafleet's engine beside llama.cpp on the same prompts: tok/s, TTFT, TPOT, RSS.

Three workloads: N requests all on the base, N requests over K adapters (request i uses adapter
i % K), and single stream (S requests decoded one after another, on the base). Each side runs in
its own process: lorafleet's engine (one spawned process for all three workloads, best of `reps`
each); llama.cpp's Python binding for single stream (the peers' venv, `llamacpp_worker.py`);
llama-server for the two concurrent workloads, N parallel slots, the K adapters converted to
GGUF LoRA (cached under build/peers/adapters/) and chosen per request through its `lora` field,
N streaming clients over HTTP. Both sides get the same prompt token ids, greedy, EOS ignored,
the same thread count, and the same GGUF file: llama.cpp computes on it as shipped (e.g. Q4_1),
lorafleet on its de-quantised copy, in float32 or in each of `settings` (its own process each:
"bfloat16", "int8", "bfloat16+int8", ...)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from lorafleet.bench import peer_tools, print_table, write_json
from lorafleet.bench.child import run_in_child
from lorafleet.bench.streaming import in_process, plan, sse_events, summarise
from lorafleet.errors import LorafleetError

WORKLOADS = ("all_base", "adapters", "single")
TARGETS = {"adapters": 2.0, "all_base": 1.0, "single": 0.5}  # lorafleet / llama.cpp, issue 19
WORKER = Path(__file__).with_name("llamacpp_worker.py")


def base_gguf(base: str) -> Path:
    """The GGUF file llama.cpp runs for `base`: an embedded model's shipped file or a .gguf."""
    from lorafleet.models import resolve_base
    from lorafleet.models.sources import embedded_gguf_path
    from lorafleet.paths import cache_dir

    source = resolve_base(base)
    if source.kind == "embedded":
        return embedded_gguf_path(source.embedded, cache_dir() / "gguf")
    if source.kind == "gguf":
        return Path(source.location)
    raise LorafleetError(f"--base {base}: the llama.cpp peers need a GGUF base (e.g. default)")


def prepare(peers, base: str, adapters: int, rank: int, requests: int, prompt_tokens: int):
    """Prompts, the K random bench adapters as PEFT dirs and as GGUF LoRA (made once, reused)."""
    from lorafleet.adapters import read_adapter, write_adapter
    from lorafleet.bench.engine import gsm8k_prompts, random_adapters
    from lorafleet.models import load_base, resolve_base
    from lorafleet.models.loader import converted_dir

    gguf = base_gguf(base)
    loaded = load_base(base)
    prompts = gsm8k_prompts(loaded.tokenizer, requests, prompt_tokens)
    work = peers.root / "adapters" / f"{loaded.fingerprint[:16]}-r{rank}"
    dirs = [work / f"a{i}" for i in range(adapters)]
    loras = [work / f"a{i}.gguf" for i in range(adapters)]
    todo = [i for i in range(adapters) if not loras[i].is_file()]
    if todo:
        print(f"converting {len(todo)} adapters to GGUF LoRA -> {work}", flush=True)
        made = random_adapters(loaded.model, max(todo) + 1, rank)
        for i in todo:
            made[i].meta["base_fingerprint"] = loaded.fingerprint
            write_adapter(dirs[i], made[i])
            peer_tools.check_convertible(made[i].config, made[i].tensors)
        peer_tools.convert(
            peers, converted_dir(resolve_base(base)), [(dirs[i], loras[i]) for i in todo]
        )
    for d in dirs[:1]:
        read_adapter(d)  # fail here, not in a child, on a damaged cache
    return {"gguf": gguf, "dirs": dirs, "loras": loras, "prompts": prompts}


# -- lorafleet ----------------------------------------------------------------------------------


def _lorafleet(cfg: dict) -> dict:
    """lorafleet's engine on every workload (one process, alternating, best of reps)."""
    import torch

    from lorafleet.adapters import read_adapter
    from lorafleet.bench.quality import parse_setting
    from lorafleet.models import load_base
    from lorafleet.serve.engine import Engine

    torch.set_num_threads(cfg["threads"])
    dtype, quantize = parse_setting(cfg.get("setting", "float32"))
    loaded = load_base(cfg["base"], dtype=dtype)
    n, p, new, prompts = cfg["requests"], cfg["prompt_tokens"], cfg["new_tokens"], cfg["prompts"]
    engine = Engine(
        loaded,
        max_slots=max(1, len(cfg["dirs"])),
        max_rank=cfg["rank"],
        max_batch_size=n,
        max_batch_tokens=max(n * p, p + 1),
        max_seq_len=p + new + 8,
        quantize=quantize,
    )
    names = [f"a{i}" for i in range(len(cfg["dirs"]))]
    for name, d in zip(names, cfg["dirs"], strict=True):
        engine.load_adapter(name, read_adapter(d))
    in_process(engine, plan(2, names[:2], [prompts[0][:8]], 2, 0.0))  # warmup
    best: dict[str, dict] = {}
    try:
        for _ in range(cfg["reps"]):
            for kind in WORKLOADS:
                if kind == "single":
                    singles = [
                        in_process(engine, plan(1, [None], [ids], new, 0.0))
                        for ids in prompts[: cfg["single"]]
                    ]
                    fig = summarise(
                        [_record(s) for s in singles], sum(s["seconds"] for s in singles)
                    )
                else:
                    who = [None] if kind == "all_base" else names
                    fig = in_process(engine, plan(n, who, prompts, new, 0.0))
                best[kind] = _best(best.get(kind), fig)
    finally:
        engine.close()
    return best


def _record(fig: dict) -> dict:
    """One request's summary back to its record (ttft, tokens, last)."""
    ttft, tokens = fig["ttft_p50"], fig["tokens"]
    last = ttft + (fig["tpot_p50"] or 0.0) * (tokens - 1) if ttft is not None else None
    return {"ttft": ttft, "tokens": tokens, "last": last}


def _best(old: dict | None, new: dict) -> dict:
    return new if old is None or new["tokens_per_s"] > old["tokens_per_s"] else old


def _lorafleet_figures(cfg: dict) -> dict:
    return {"workloads": _lorafleet(cfg)}


def run_lorafleet(cfg: dict, limit_s: float) -> dict:
    """lorafleet's side in its own process (its own peak RSS), as each peer runs in its own."""
    return run_in_child(_lorafleet_figures, cfg, limit_s=limit_s)


# -- llama.cpp -----------------------------------------------------------------------------------


def run_binding(peers, cfg: dict, limit_s: float) -> dict:
    """Single stream through llama.cpp's Python binding, in the peers' venv."""
    spec = {
        "model": str(cfg["gguf"]),
        "prompts": cfg["prompts"][: cfg["single"]],
        "new_tokens": cfg["new_tokens"],
        "threads": cfg["threads"],
        "reps": cfg["reps"],
        "n_ctx": cfg["prompt_tokens"] + cfg["new_tokens"] + 8,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [str(peers.python), str(WORKER), f.name],
            capture_output=True,
            text=True,
            env=peers.binding_env(),
            timeout=limit_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {limit_s:.0f} s"}
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"llama.cpp binding exited with {proc.returncode}: {tail[:300]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fig = summarise(out["records"], out["seconds"])
    return {
        "workloads": {"single": fig},
        "peak_rss_mb": out["peak_rss_mb"],
        "request0": out["request0"],
    }


async def _stream(http, url: str, body: dict, t0: float) -> dict:
    rec = {"ttft": None, "tokens": 0, "last": None, "ids": []}
    async with http.stream("POST", url + "/completion", json=body) as resp:
        async for event in sse_events(resp, "llama-server"):
            if event.get("tokens"):
                now = time.perf_counter() - t0
                rec["ttft"] = now if rec["ttft"] is None else rec["ttft"]
                rec["last"] = now
                rec["tokens"] += len(event["tokens"])
                rec["ids"] += event["tokens"]
    return rec


async def over_server(url: str, bodies: list[dict]) -> dict:
    """Every request as a concurrent streaming client; the summary plus request 0's tokens."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(_stream(http, url, b, t0) for b in bodies))
        wall = time.perf_counter() - t0
    return {**summarise(records, wall), "request0": records[0]["ids"]}


def _wait_ready(proc, url: str, log, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-600:]
            raise LorafleetError(f"llama-server exited with code {proc.returncode}: {tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LorafleetError(f"llama-server did not answer /health within {timeout:.0f} s")


def server_workloads(cfg: dict) -> dict[str, list[dict]]:
    """`bench engine`'s concurrent workloads as llama-server requests: all on the base, and
    request i on LoRA i % K."""
    n, k, prompts = cfg["requests"], len(cfg["loras"]), cfg["prompts"]
    return {
        kind: [
            peer_tools.completion_body(
                prompts[i % len(prompts)], cfg["new_tokens"], None if kind == "all_base" else i % k
            )
            for i in range(n)
        ]
        for kind in ("all_base", "adapters")
    }


def run_server(peers, cfg: dict, workloads: dict[str, list[dict]]) -> dict:
    """Each workload (a list of request bodies, sent at once by streaming clients) through one
    llama-server with as many slots as the largest workload, every LoRA loaded at scale 0;
    best of reps (alternating)."""
    from lorafleet.serve.api.server import free_port

    slots = max(len(bodies) for bodies in workloads.values())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slot_ctx = cfg["prompt_tokens"] + cfg["new_tokens"] + 8
    args = peer_tools.server_command(
        peers, cfg["gguf"], cfg["loras"], slots, slot_ctx, cfg["threads"], port
    )
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    best: dict[str, dict] = {}
    try:
        _wait_ready(proc, url, log)
        k = len(cfg["loras"])
        warm = [
            peer_tools.completion_body(cfg["prompts"][0][:8], 2, i % k if k else None)
            for i in range(2)
        ]
        asyncio.run(over_server(url, warm))
        for _ in range(cfg["reps"]):
            for kind, bodies in workloads.items():
                best[kind] = _best(best.get(kind), asyncio.run(over_server(url, bodies)))
        rss = peer_tools.peak_rss_mb(proc.pid)
    except LorafleetError as exc:
        return {"error": str(exc).splitlines()[0][:300]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return {"workloads": best, "peak_rss_mb": rss}


# -- the run -------------------------------------------------------------------------------------


def label(setting: str) -> str:
    """The results key of lorafleet in one setting: "lorafleet" (float32), "lorafleet bfloat16"."""
    from lorafleet.bench.quality import parse_setting

    parts = [p for p in parse_setting(setting) if p not in ("float32", "none")]
    return "lorafleet " + "+".join(parts) if parts else "lorafleet"


def run(
    base: str = "default",
    requests: int = 32,
    adapters: int = 16,
    prompt_tokens: int = 100,
    new_tokens: int = 64,
    rank: int = 16,
    single: int = 4,
    reps: int = 2,
    threads: int | None = None,
    peers_dir: str | Path | None = None,
    quick: bool = False,
    limit_s: float = 1800.0,
    settings: tuple[str, ...] = ("float32",),
    json_out: str | Path = "bench/results/peers.json",
) -> dict:
    """lorafleet (in each of `settings`: dtype / quantisation, e.g. "bfloat16"), llama.cpp's
    binding and llama-server on the three workloads; table + JSON."""
    labels = {label(s): s for s in settings}  # a bad setting fails before anything runs
    peers = peer_tools.require(peers_dir)
    if quick:  # the sizes of `bench engine --quick`
        requests, adapters, new_tokens, prompt_tokens = 8, 4, 16, 32
    threads = threads or os.cpu_count() or 1
    cfg = {
        "base": base,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "rank": rank,
        "new_tokens": new_tokens,
        "single": min(single, requests),
        "reps": reps,
        "threads": threads,
    }
    cfg.update(prepare(peers, base, adapters, rank, requests, prompt_tokens))
    results = {}
    for name, setting in labels.items():
        print(f"running {name} (all_base, adapters, single) ...", flush=True)
        results[name] = run_lorafleet({**cfg, "setting": setting}, limit_s)
    print("running llama.cpp binding (single) ...", flush=True)
    results["llama.cpp"] = run_binding(peers, cfg, limit_s)
    print(f"running llama-server ({requests} slots: all_base, adapters) ...", flush=True)
    results["llama-server"] = run_server(peers, cfg, server_workloads(cfg))
    return _report(results, cfg, json_out)


def _ratio(results: dict, kind: str, ours_key: str = "lorafleet") -> float | None:
    ours = results[ours_key].get("workloads", {}).get(kind)
    peer = "llama.cpp" if kind == "single" else "llama-server"
    theirs = results[peer].get("workloads", {}).get(kind)
    if not ours or not theirs or not theirs["tokens_per_s"]:
        return None
    return ours["tokens_per_s"] / theirs["tokens_per_s"]


def _report(results: dict, cfg: dict, json_out) -> dict:
    rows = []
    for who, r in results.items():
        if "error" in r:
            print(f"  {who}: {r['error']}", flush=True)
        for kind in WORKLOADS:
            fig = r.get("workloads", {}).get(kind)
            if fig:
                rows.append(
                    {
                        "system": who,
                        "workload": kind,
                        "tokens": fig["tokens"],
                        "tok_per_s": fig["tokens_per_s"],
                        "ttft_p50": fig["ttft_p50"],
                        "ttft_p99": fig["ttft_p99"],
                        "tpot_p50": fig["tpot_p50"],
                        "tpot_p99": fig["tpot_p99"],
                        "peak_rss_mb": round(r["peak_rss_mb"]),
                    }
                )
    if rows:
        print_table(
            rows,
            [
                "system",
                "workload",
                "tokens",
                "tok_per_s",
                "ttft_p50",
                "ttft_p99",
                "tpot_p50",
                "tpot_p99",
                "peak_rss_mb",
            ],
        )
    by_setting: dict[str, dict] = {}
    for ours in (k for k in results if k.startswith("lorafleet")):
        found = by_setting[ours] = {}
        for kind, goal in TARGETS.items():
            ratio = _ratio(results, kind, ours)
            found[kind] = {
                "lorafleet_vs_llama_cpp": ratio,
                "target": goal,
                "met": None if ratio is None else ratio >= goal,
            }
            shown = "n/a" if ratio is None else f"{ratio:.2f}x"
            verdict = {None: "unknown", True: "met", False: "NOT met"}[found[kind]["met"]]
            print(f"{kind}: {ours} / llama.cpp = {shown} (target >= {goal}x): {verdict}")
    targets = by_setting.get("lorafleet") or next(iter(by_setting.values()), {})
    server = results["llama-server"].get("workloads", {})
    lora_changes = None
    if "all_base" in server and "adapters" in server:
        lora_changes = server["all_base"]["request0"] != server["adapters"]["request0"]
        print(f"llama-server: request 0's tokens change with its LoRA: {lora_changes}")
    for r in server.values():
        r.pop("request0", None)
    figures = {
        "benchmark": "peers",
        "base": cfg["base"],
        "gguf": str(cfg["gguf"]),
        "requests": cfg["requests"],
        "adapters": len(cfg["loras"]),
        "rank": cfg["rank"],
        "prompt_tokens": cfg["prompt_tokens"],
        "new_tokens": cfg["new_tokens"],
        "single_requests": cfg["single"],
        "threads": cfg["threads"],
        "load_average": os.getloadavg(),
        "targets": targets,
        "targets_by_setting": by_setting,
        "llama_server_lora_changes_tokens": lora_changes,
        "results": results,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures


def serve_peer(
    base: str,
    clients: tuple[int, ...],
    names: list[str | None],
    prompts: list,
    new_tokens: int,
    prompt_tokens: int,
    rank: int,
    reps: int,
    threads: int,
    peers_dir=None,
) -> dict:
    """`bench serve`'s requests (client i: adapter names[i % len], prompt i % len) through
    llama-server, each N of `clients` as one workload: {"workloads": {"N": summary}, ...}."""
    peers = peer_tools.require(peers_dir)
    if any(n is not None and not re.fullmatch(r"a\d+", n) for n in names):
        raise LorafleetError("--peers runs the random bench adapters only, not --adapters-dir")
    k = sum(n is not None for n in names)
    cfg = {
        **prepare(peers, base, k, rank, max(clients), prompt_tokens),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "reps": reps,
        "threads": threads,
    }
    cfg["prompts"] = prompts

    def lora(i: int) -> int | None:
        name = names[i % len(names)]
        return None if name is None else int(name[1:])

    workloads = {
        str(n): [
            peer_tools.completion_body(prompts[i % len(prompts)], new_tokens, lora(i))
            for i in range(n)
        ]
        for n in clients
    }
    print(f"llama-server: {max(clients)} slots, {k} GGUF LoRAs", flush=True)
    return run_server(peers, cfg, workloads)
