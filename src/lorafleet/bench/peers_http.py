"""`lorafleet bench serve --peers`: `lorafleet serve` against llama-server tuned as its users
tune it, both behind HTTP with the same client.

Both servers run at once on loopback, each idle while the other is measured; one client (this
process: httpx, asyncio, SSE) sends the same OpenAI `/v1/completions` streaming requests to
each: prompt token ids, `max_tokens` with `ignore_eos`, greedy; the only differences are how a
request names its adapter (lorafleet: `model`; llama-server: its `lora` field, every LoRA
loaded at scale 0) and each server's own knobs. lorafleet runs in its default setting (what
`lorafleet serve` does with no flags); llama-server on the GGUF matching that setting's bytes
(peers.matched_gguf; the shipped Q4_1 where none does), the LoRAs converted to GGUF in the
precision lorafleet keeps adapters in (its dtype), -np = the concurrency.

llama-server's configuration is picked by a short pre-run on the headline workload: its
defaults (greedy by temperature 0), each candidate knob alone (`-b 512 -ub 512 -fa on`; greedy
by `samplers: ["top_k"], top_k: 1`; `--poll 0`; `-kvu`; every core as a thread), then the knobs
that beat the defaults together; the fastest is kept (reported with its figure).

Workloads (PeerTableConfig): `requests` requests over `adapters` adapters (request i on adapter
i % adapters), the same all on the base, and a single stream (one request); each run has fresh
prompts (no cache serves a run from an earlier one), the same on both sides. Interleaved
(lorafleet, llama-server, next workload, ..., next repetition), the 1-minute load average read
before each run, median [min-max] over `reps`; ratio = median over median; target: requests
over adapters >= 2x (peers_config.TARGETS["http_adapters"]).

llama-server computes every LoRA it has loaded for every token, scale 0 or not (measured: 32
base requests at 26 tok/s with 16 LoRAs loaded, 310 with none). So the base-only workloads
also run on a second llama-server with the same flags and no LoRAs (NO_LORAS): what a user
serving only the base would run, and the fair peer of those rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.bench import peer_tools, peers, print_table, write_json
from lorafleet.bench.peers_batched import buffer_mib
from lorafleet.bench.peers_config import TARGETS, PeerTableConfig
from lorafleet.bench.peers_runs import interleave, load1, ratio, shown, summarise_reps, verdict
from lorafleet.bench.settings import parse_setting
from lorafleet.bench.streaming import sse_events, summarise
from lorafleet.errors import LorafleetError

WORKLOADS = ("adapters", "all_base", "single")
METRICS = ("gen_tok_s", "ttft_p50", "tpot_p50")
SYSTEMS = ("lorafleet", "llama-server")
NO_LORAS = "llama-server-no-loras"  # the same flags and GGUF, no LoRA loaded: base rows only
BASE_NAME = "base"  # the id lorafleet serves its base under here


# -- llama-server's candidates -------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One llama-server configuration: extra server flags and extra request fields."""

    name: str
    flags: tuple[str, ...] = ()
    body: dict = field(default_factory=dict)


GREEDY_TEMPERATURE = {"temperature": 0.0}  # the common sampler chain, argmax at temperature 0
GREEDY_TOP_K = {"samplers": ["top_k"], "top_k": 1}  # the chain cut to one top-k sampler


def knobs(threads: int, cores: int) -> list[Candidate]:
    """The issue's candidate knobs, each alone on top of the defaults."""
    found = [
        Candidate("-b 512 -ub 512 -fa on", ("-b", "512", "-ub", "512", "-fa", "on")),
        Candidate("samplers top_k, top_k 1", (), GREEDY_TOP_K),
        Candidate("--poll 0", ("--poll", "0")),
        Candidate("-kvu", ("-kvu",)),
    ]
    if cores != threads:
        found.append(Candidate(f"-t {cores}", ("-t", str(cores), "-tb", str(cores))))
    return found


def combine(name: str, threads: int, parts: list[Candidate]) -> Candidate:
    """One candidate holding every flag and request field of `parts` (later ones win); the
    thread count `threads` unless a part sets its own."""
    flags: list[str] = []
    body = dict(GREEDY_TEMPERATURE)
    for part in parts:
        flags += part.flags
        body.update(part.body)
    if "-t" not in flags:
        flags = ["-t", str(threads), "-tb", str(threads), *flags]
    return Candidate(name, tuple(flags), body)


def winners(results: dict[str, float], baseline: str) -> list[str]:
    """The candidates (by name) faster than `baseline` in `results` {name: tok/s}."""
    floor = results[baseline]
    return [name for name, value in results.items() if name != baseline and value > floor]


def best(results: dict[str, float]) -> str:
    """The fastest candidate's name (the first listed among equals)."""
    return max(results, key=lambda name: (results[name], -list(results).index(name)))


# -- the shared client ---------------------------------------------------------------------------


def request_body(system: str, prompt: list[int], new_tokens: int, adapter: int | None, extra):
    """One streaming /v1/completions request for `system` ("lorafleet" / "llama-server"):
    greedy, exactly `new_tokens` tokens (EOS ignored), usage in the last event; the adapter
    index `adapter` (None: the base) named as that server wants it; `extra` fields on top."""
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **GREEDY_TEMPERATURE,
    }
    if system == "lorafleet":
        body["model"] = BASE_NAME if adapter is None else f"a{adapter}"
    else:  # every LoRA loaded at scale 0; a request scales its own to 1; no prompt reuse
        body["lora"] = [] if adapter is None else [{"id": adapter, "scale": 1.0}]
        body["cache_prompt"] = False
    return {**body, **(extra or {})}


async def _one(http, url: str, body: dict, t0: float, who: str) -> dict:
    rec = {"ttft": None, "tokens": 0, "last": None, "chunks": 0}
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        async for event in sse_events(resp, who):
            now = time.perf_counter() - t0
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                rec["ttft"] = now if rec["ttft"] is None else rec["ttft"]
                rec["last"] = now
                rec["chunks"] += 1
            if event.get("usage"):
                rec["tokens"] = event["usage"]["completion_tokens"]
    rec["tokens"] = rec["tokens"] or rec["chunks"]
    if rec["tokens"] != body["max_tokens"]:
        raise LorafleetError(f"{who}: {rec['tokens']} tokens, asked {body['max_tokens']}")
    return rec


async def send_all(url: str, bodies: list[dict], who: str) -> dict:
    """Every body as a concurrent streaming request at once; summary (tok/s of wall time, TTFT
    and TPOT p50/p99) of the lot."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(_one(http, url, b, t0, who) for b in bodies))
        wall = time.perf_counter() - t0
    out = summarise(records, wall)
    out["gen_tok_s"] = out.pop("tokens_per_s")
    return out


def workload_bodies(
    system: str, kind: str, prompts: list[list[int]], new_tokens: int, adapters: int, extra
) -> list[dict]:
    """`kind`'s requests: "adapters" (request i on adapter i % adapters), "all_base", "single"
    (the first prompt alone, base)."""
    if kind == "single":
        prompts = prompts[:1]
    return [
        request_body(system, ids, new_tokens, i % adapters if kind == "adapters" else None, extra)
        for i, ids in enumerate(prompts)
    ]


# -- the servers ---------------------------------------------------------------------------------


def _wait_ready(proc, url: str, log, who: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LorafleetError(f"{who} exited with code {proc.returncode}: {tail[0][:300]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise LorafleetError(f"{who} did not answer /health within {timeout:.0f} s")


class LlamaServer:
    """llama-server on a free loopback port with `candidate`'s flags: `slots` slots (-np) of
    `slot_ctx` tokens each, every LoRA loaded at scale 0, no prompt cache in RAM."""

    def __init__(self, found, gguf: Path, loras: list[Path], slots: int, slot_ctx: int, cand):
        from lorafleet.serve.api.server import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = peer_tools.server_command(found, gguf, loras, slots, slot_ctx, port, cand.flags)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(self.proc, self.url, self.log, "llama-server")
        except LorafleetError:
            self.stop()
            raise

    def memory(self) -> dict:
        """Its buffers as logged (weights / KV / compute / LoRA MiB) and its peak RSS."""
        self.log.seek(0)
        out = buffer_mib(self.log.read().decode(errors="replace"))
        out["peak_rss_mb"] = peer_tools.peak_rss_mb(self.proc.pid)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def lorafleet_server(base: str, adapters_root: Path, cfg: PeerTableConfig):
    """`lorafleet serve` in its default setting (no --dtype / --quantize) over the bench
    adapters, sized for the workload, its threads its own default (or cfg.threads)."""
    from lorafleet.bench.serve import ServerProcess

    p, n = cfg.prompt_tokens, cfg.requests
    settings = {
        "max_adapters": cfg.adapters,
        "max_rank": cfg.rank,
        "max_batch_size": n,
        "max_batch_tokens": max(2048, n * p),
        "max_seq_len": p + cfg.new_tokens + 8,
    }
    if cfg.threads:
        settings["threads"] = cfg.threads
    server = ServerProcess(base, adapters_root, settings, BASE_NAME)
    try:
        server.wait_ready()
    except LorafleetError:
        server.stop()
        raise
    return server


# -- the run -------------------------------------------------------------------------------------


def tune(threads: int, cores: int, measure: Callable[[Candidate], float]) -> dict:
    """A skilled user's pre-run: the defaults, each knob alone, then the knobs that beat the
    defaults together, each measured once by `measure` (tok/s); the fastest is kept.
    -> {"results": {name: tok/s}, "best": name, "candidate": the best Candidate}."""
    tried: dict[str, Candidate] = {}
    results: dict[str, float] = {}

    def attempt(cand: Candidate) -> None:
        tried[cand.name], results[cand.name] = cand, measure(cand)
        print(f"  llama-server {cand.name:<40} {results[cand.name]:7.1f} tok/s", flush=True)

    options = knobs(threads, cores)
    attempt(combine("defaults", threads, []))
    for knob in options:
        attempt(combine(knob.name, threads, [knob]))
    good = [k for k in options if k.name in winners(results, "defaults")]
    if len(good) > 1:
        attempt(combine(" + ".join(k.name for k in good), threads, good))
    name = best(results)
    return {"results": results, "best": name, "candidate": tried[name]}


def prerun(found, gguf, loras, cfg: PeerTableConfig, threads: int, prompts, new_tokens) -> dict:
    """`tune` with each candidate's own llama-server (started, one run of `cfg.requests`
    requests over `cfg.adapters` adapters of `new_tokens` tokens, stopped)."""
    slot_ctx = cfg.prompt_tokens + cfg.new_tokens + 8

    def measure(cand: Candidate) -> float:
        server = LlamaServer(found, gguf, loras, cfg.requests, slot_ctx, cand)
        try:
            bodies = workload_bodies(
                "llama-server", "adapters", prompts, new_tokens, cfg.adapters, cand.body
            )
            return asyncio.run(send_all(server.url, bodies, "llama-server"))["gen_tok_s"]
        finally:
            server.stop()

    return tune(threads, os.cpu_count() or threads, measure)


def run(
    cfg: PeerTableConfig,
    default_setting: str,
    base: str = "default",
    peers_dir: str | Path | None = None,
    json_out: str | Path = "bench/results/serve-peers.json",
) -> dict:
    """The HTTP table (module docstring); printed, written to `json_out`, returned."""
    from lorafleet.models import load_base

    found = peer_tools.require(peers_dir, tools=("server", "convert"))
    dtype, _ = parse_setting(default_setting)
    gguf_type = peers.matched_gguf(default_setting) or peers.SHIPPED
    gguf = peers.peer_gguf(found, base, gguf_type)
    lora_type = peer_tools.lora_outtype(dtype)
    dirs, loras = peers.bench_adapters(found, base, cfg.adapters, cfg.rank, lora_type)
    n, new = cfg.requests, cfg.new_tokens
    per_rep = 2 * n + 1
    prompts = peers.prompts_for(
        load_base(base).tokenizer, (cfg.reps + 1) * per_rep, cfg.prompt_tokens
    )
    lorafleet_threads = cfg.threads or max(1, (os.cpu_count() or 2) - 1)  # serve's default
    print(f"starting lorafleet serve ({peers.setting_name(default_setting)}) ...", flush=True)
    ours = lorafleet_server(base, dirs[0].parent, cfg)
    theirs = plain = None
    runs: dict[str, list[dict]] = {}
    try:
        warm = prompts[-per_rep:]
        asyncio.run(
            send_all(
                ours.url,
                workload_bodies("lorafleet", "adapters", warm[:n], 4, cfg.adapters, None),
                "lorafleet",
            )
        )
        print(f"llama-server pre-run ({gguf_type}, {lora_type} LoRAs, {n} slots):", flush=True)
        picked = prerun(found, gguf, loras, cfg, lorafleet_threads, warm[:n], max(2, new // 2))
        cand = picked["candidate"]
        print(f"  best: {cand.name} ({picked['results'][cand.name]:.1f} tok/s)", flush=True)
        slot_ctx = cfg.prompt_tokens + new + 8
        theirs = LlamaServer(found, gguf, loras, n, slot_ctx, cand)
        plain = LlamaServer(found, gguf, [], n, slot_ctx, cand)
        urls = {"lorafleet": ours.url, "llama-server": theirs.url, NO_LORAS: plain.url}
        extra = {"lorafleet": None, "llama-server": cand.body, NO_LORAS: cand.body}
        order = interleave([f"{w}|{s}" for w in WORKLOADS for s in systems(w)], cfg.reps)
        for rep, key in order:
            kind, system = key.split("|")
            batch = prompts[rep * per_rep : (rep + 1) * per_rep]
            batch = batch[:n] if kind == "adapters" else batch[n:]
            client = "lorafleet" if system == "lorafleet" else "llama-server"
            bodies = workload_bodies(client, kind, batch, new, cfg.adapters, extra[system])
            load = load1()
            fig = asyncio.run(send_all(urls[system], bodies, system))
            runs.setdefault(key, []).append({**fig, "load1": load})
            print(
                f"rep {rep + 1}/{cfg.reps} {kind:<9} {system:<21} {fig['gen_tok_s']:7.1f} tok/s "
                f"(TTFT p50 {fig['ttft_p50']:.2f} s, load {load:.2f})",
                flush=True,
            )
        memory = {
            "lorafleet": {"peak_rss_mb": peer_tools.peak_rss_mb(ours.proc.pid)},
            "llama-server": theirs.memory(),
        }
        memory[NO_LORAS] = {"peak_rss_mb": peer_tools.peak_rss_mb(plain.proc.pid)}
        theirs.stop()
        plain.stop()
        theirs = plain = None
        # Its buffer sizes are logged at -lv 4 only, which also traces every slot step: read
        # them from a copy started after the runs, never from the server measured.
        probe = LlamaServer(
            found, gguf, loras, n, slot_ctx, Candidate(cand.name, (*cand.flags, "-lv", "4"))
        )
        memory["llama-server"].update(
            {k: v for k, v in probe.memory().items() if k != "peak_rss_mb"}
        )
        probe.stop()
    finally:
        ours.stop()
        for server in (theirs, plain):
            if server is not None:
                server.stop()
    info = {
        "base": base,
        "setting": peers.setting_name(default_setting),
        "gguf": gguf_type,
        "gguf_path": str(gguf),
        "lora_type": lora_type,
        "lorafleet_threads": lorafleet_threads,
        "prerun": {"results": picked["results"], "best": picked["best"]},
        "llama_server_flags": list(cand.flags),
        "llama_server_request_fields": cand.body,
    }
    return report(runs, memory, cfg, info, json_out)


def systems(workload: str) -> tuple[str, ...]:
    """The servers a workload runs on: both, and for the base-only ones also NO_LORAS."""
    return SYSTEMS if workload == "adapters" else (*SYSTEMS, NO_LORAS)


def table_rows(summary: dict) -> list[dict]:
    """One row per workload: each side's tok/s and TTFT p50 (median [min-max]), the ratio of
    the tok/s medians, and its target and verdict where the issue sets one; base-only rows
    also llama-server without LoRAs and the ratio against it."""
    rows = []
    for kind in WORKLOADS:
        a, b = summary.get(f"{kind}|lorafleet", {}), summary.get(f"{kind}|llama-server", {})
        c = summary.get(f"{kind}|{NO_LORAS}", {})
        value = ratio(a.get("gen_tok_s"), b.get("gen_tok_s"))
        target = TARGETS["http_adapters"] if kind == "adapters" else None
        rows.append(
            {
                "workload": kind,
                "lorafleet": a.get("gen_tok_s"),
                "llama_server": b.get("gen_tok_s"),
                "lorafleet_ttft_p50": a.get("ttft_p50"),
                "llama_server_ttft_p50": b.get("ttft_p50"),
                "ratio": value,
                "llama_server_no_loras": c.get("gen_tok_s"),
                "ratio_no_loras": ratio(a.get("gen_tok_s"), c.get("gen_tok_s")),
                "target": target,
                "verdict": verdict(value, target) if target else "no target",
                "load1": {
                    "lorafleet": a.get("load1"),
                    "llama-server": b.get("load1"),
                    NO_LORAS: c.get("load1"),
                },
            }
        )
    return rows


def report(runs: dict, memory: dict, cfg: PeerTableConfig, info: dict, json_out) -> dict:
    summary = {key: summarise_reps(rs, METRICS) for key, rs in runs.items()}
    rows = table_rows(summary)
    printed = [
        {
            "workload": r["workload"],
            "lorafleet tok/s": shown(r["lorafleet"]),
            "llama-server tok/s": shown(r["llama_server"]),
            "ratio": ("-" if r["ratio"] is None else f"{r['ratio']:.2f}x")
            + (f" (>= {r['target']}x: {r['verdict']})" if r["target"] else ""),
            "no-LoRA llama-server tok/s": shown(r["llama_server_no_loras"]),
            "ratio to it": "-" if r["ratio_no_loras"] is None else f"{r['ratio_no_loras']:.2f}x",
            "TTFT p50 s lf / ls": f"{shown(r['lorafleet_ttft_p50'], 2)} / "
            f"{shown(r['llama_server_ttft_p50'], 2)}",
        }
        for r in rows
    ]
    print(
        f"\nover HTTP, the same client: generated tok/s, median [min-max] of {cfg.reps}; "
        f"llama-server: {info['prerun']['best']}"
    )
    print_table(printed, list(printed[0]))
    loads = [
        {"workload|system": key, "load1 per rep": " ".join(f"{x:.2f}" for x in s["load1"])}
        for key, s in summary.items()
    ]
    print_table(loads, ["workload|system", "load1 per rep"])
    print(f"memory: {memory}")
    figures = {
        "benchmark": "peers_http",
        **info,
        "requests": cfg.requests,
        "adapters": cfg.adapters,
        "rank": cfg.rank,
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
        "reps": cfg.reps,
        "rows": rows,
        "summary": summary,
        "runs": runs,
        "memory": memory,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
