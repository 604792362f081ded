"""Benchmark: lorafleet on Ray Serve, routing by adapter (Ray's multiplexing: `affinity`)
against adapter-blind routing over the same replicas (`round_robin`: no model id, so Ray's
power-of-two-choices balancer), on replica layouts of the same cores (2 replicas x 1 thread,
1 replica x 2 threads), Zipf and uniform adapter draws; plus the Ray ingress against
`lorafleet serve` for one replica.

The load: `clients` streaming clients, closed loop (each sends its next request when the
last one ends), `clients * per_client` requests in all, each on an adapter drawn from
`adapters` random rank-`rank` q/v adapters (thousand.draw: uniform, or Zipf(1.0) over a
shuffled ranking); prompts cut from gsm8k text, `new_tokens` each, greedy, EOS ignored. Every
run gets the very same requests, starts from a fresh fleet in its own process and is warmed
on the base model first. Per run: total tokens/s (tokens / wall time), TTFT p50 / p99 (from
each request's send), adapter loads = adapters put in a replica's slots (the registries'
`misses + cpu_hits`, summed over replicas, from /metrics), per 1,000 requests.

The pass rule (decided before any figure, printed first): for each draw on the two-replica
layout, affinity loads fewer adapters per 1,000 requests than round_robin, and its tokens/s
is at least (1 - `tolerance`) of round_robin's (not slower, within noise)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from lorafleet.bench.fleet_config import LAYOUTS, RoutingConfig
from lorafleet.bench.streaming import pct, sse_events
from lorafleet.errors import LorafleetError

STATS_LAG_S = 1.5  # a Ray ingress's replica figures are ~0.5 s old: wait before reading them
LOAD_COUNTERS = ("lorafleet_adapter_cache_misses_total", "lorafleet_adapter_cache_cpu_hits_total")
PASS_RULE = (
    "PASS when, for each draw on the 2x1 layout, affinity loads fewer adapters per 1,000 "
    "requests than round_robin AND its tokens/s is at least (1 - {tol:g}) of round_robin's"
)


# -- the pass rule -------------------------------------------------------------------------------


def verdict(runs: list[dict], tolerance: float = 0.05) -> dict:
    """The pass rule over `runs` (rows with popularity, layout, routing, loads_per_1000,
    tokens_per_s): one check per draw of the 2x1 layout, and `passed` when all hold (a draw
    missing either routing fails its check)."""
    checks = {}
    for popularity in sorted({r["popularity"] for r in runs}):
        pair = {
            r["routing"]: r
            for r in runs
            if r["popularity"] == popularity and r["layout"] == "2x1" and "error" not in r
        }
        aff, rr = pair.get("affinity"), pair.get("round_robin")
        if aff is None or rr is None:
            checks[popularity] = {"ok": False, "why": "affinity or round_robin run missing"}
            continue
        fewer = aff["loads_per_1000"] < rr["loads_per_1000"]
        ratio = aff["tokens_per_s"] / rr["tokens_per_s"]
        checks[popularity] = {
            "ok": fewer and ratio >= 1 - tolerance,
            "loads_per_1000": [aff["loads_per_1000"], rr["loads_per_1000"]],
            "tokens_per_s_ratio": ratio,
        }
    return {"checks": checks, "passed": bool(checks) and all(c["ok"] for c in checks.values())}


# -- the load ------------------------------------------------------------------------------------


def plan(
    cfg: RoutingConfig, names: list[str], prompts: list[list[int]], popularity: str, seed: int
):
    """The run's requests: (adapter name, prompt ids), the same for every run of a draw."""
    from lorafleet.bench.thousand import draw

    n = cfg.clients * cfg.per_client
    picks = draw(popularity, len(names), n, seed)
    return [(names[k], prompts[i % len(prompts)]) for i, k in enumerate(picks)]


async def _one(http, url: str, model: str, prompt, max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, rec = time.perf_counter(), {"ttft": None, "tokens": 0}
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        async for event in sse_events(resp, "the server"):
            if rec["ttft"] is None and event.get("choices") and event["choices"][0].get("text"):
                rec["ttft"] = time.perf_counter() - sent
            if event.get("usage"):
                rec["tokens"] = event["usage"]["completion_tokens"]
    return rec


async def closed_loop(url: str, requests: list[tuple[str, list[int]]], clients: int, tokens: int):
    """`clients` workers each taking the next request when its last one ended; the records
    and the wall time."""
    import httpx

    todo = iter(requests)
    records: list[dict] = []

    async def worker(http) -> None:
        for model, prompt in todo:
            records.append(await _one(http, url, model, prompt, tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        return records, time.perf_counter() - began


def slot_loads(url: str) -> int:
    """Adapters put in slots so far, summed over replicas: /metrics' registry counters."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in LOAD_COUNTERS:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def measure(url: str, cfg: RoutingConfig, requests, warm: int) -> dict:
    """Warm the server on the base (`warm` concurrent short requests), then the requests."""
    asyncio.run(closed_loop(url, [("base", requests[0][1])] * warm, warm, 4))
    time.sleep(STATS_LAG_S)
    before = slot_loads(url)
    records, wall = asyncio.run(closed_loop(url, requests, cfg.clients, cfg.new_tokens))
    time.sleep(STATS_LAG_S)
    loads = slot_loads(url) - before
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    return {
        "requests": len(records),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "adapter_loads": loads,
        "loads_per_1000": 1000 * loads / len(records),
    }


# -- the servers, each in its own process --------------------------------------------------------


class FleetProcess:
    """A lorafleet fleet on a local Ray cluster (start_fleet + its HTTP ingress) in a child
    process of its own session; `stop()` ends it (SIGTERM: the fleet closes and shuts Ray
    down; the session is killed if it has not ended within a minute)."""

    def __init__(
        self, cfg: RoutingConfig, adapters_dir: Path, replicas: int, threads: int, routing: str
    ):
        from lorafleet.serve.api.server import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        spec = {
            "base": cfg.base,
            "adapters_dir": str(adapters_dir),
            "replicas": replicas,
            "threads": threads,
            "routing": routing,
            "settings": cfg.settings(),
            "port": int(self.url.rsplit(":", 1)[1]),
        }
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.bench.ray_routing", json.dumps(spec)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-800:]
                raise LorafleetError(f"the fleet exited with code {self.proc.returncode}: {tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise LorafleetError(f"the fleet did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


def serve_fleet(spec_json: str) -> None:
    """The child's side of FleetProcess: serve until SIGTERM, then close the fleet."""
    from lorafleet.serve.api.config import EngineSettings, ServerConfig
    from lorafleet.serve.ray import start_fleet

    spec = json.loads(spec_json)
    fleet = start_fleet(
        spec["base"],
        spec["adapters_dir"],
        replicas=spec["replicas"],
        threads=spec["threads"],
        routing=spec["routing"],
        settings=EngineSettings(**spec["settings"]),
        config=ServerConfig(model_name="base"),
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # after Ray's own set-up
    try:
        fleet.start_http(port=spec["port"])
        while not done.wait(1.0):
            pass
    finally:
        fleet.close()


# -- the run -------------------------------------------------------------------------------------


def variants(layouts, routings, ingress: bool):
    """(label, layout, routing) of each run: every routing on a many-replica layout, one run
    on a one-replica layout (routing cannot matter there), `lorafleet serve` for the ingress."""
    out = []
    for layout in layouts:
        replicas, _ = LAYOUTS[layout]
        for routing in routings if replicas > 1 else routings[:1]:
            out.append((f"ray {layout} {routing}", layout, routing))
    if ingress:
        out.append(("serve 1x2", "1x2", "serve"))
    return out


def _serve_one(cfg, root, layout, routing, requests, label) -> dict:
    from lorafleet.bench.serve import ServerProcess

    replicas, threads = LAYOUTS[layout]
    if routing == "serve":
        server = ServerProcess(cfg.base, root, {**cfg.settings(), "threads": threads}, "base")
    else:
        server = FleetProcess(cfg, root, replicas, threads, routing)
    try:
        print(f"{label}: starting", flush=True)
        server.wait_ready()
        return measure(server.url, cfg, requests, warm=2 * replicas)
    except Exception as exc:  # one failed run is a row with its reason, not a crashed bench
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        server.stop()


def run(cfg: RoutingConfig, json_out: str | Path = "bench/results/ray_routing.json") -> dict:
    """Every variant on the same requests per draw, each in a fresh server process; prints
    the pass rule first, then the table and the verdict; writes the JSON."""
    from lorafleet.bench import print_table, write_json
    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.bench.thousand import adapter_names, ensure_adapters
    from lorafleet.models import load_base
    from lorafleet.serve.ray import require_ray

    require_ray()
    rule = PASS_RULE.format(tol=cfg.tolerance)
    print(f"pass rule: {rule}", flush=True)
    cache = Path(cfg.cache_dir or f"runs/bench-adapters/{cfg.base}-r{cfg.rank}-qv")
    root = ensure_adapters(cfg.base, cfg.adapters, cfg.rank, cache)
    names = adapter_names(cfg.adapters)
    prompts = gsm8k_prompts(load_base(cfg.base).tokenizer, cfg.clients, cfg.prompt_tokens)
    rows = []
    for pop in cfg.popularity:
        requests = plan(cfg, names, prompts, pop, cfg.seed)
        for label, layout, routing in variants(cfg.layouts, cfg.routings, cfg.ingress):
            out = _serve_one(cfg, root, layout, routing, requests, f"{pop} / {label}")
            row = {"popularity": pop, "variant": label, "layout": layout, "routing": routing}
            rows.append({**row, **out})
    _ingress_ratios(rows)
    columns = ["popularity", "variant", "requests", "tokens_per_s", "ttft_p50", "ttft_p99"]
    columns += ["adapter_loads", "loads_per_1000", "ray_vs_serve_tokens_per_s", "error"]
    print_table(rows, columns)
    result = verdict(rows, cfg.tolerance)
    for pop, check in result["checks"].items():
        print(f"{'PASS' if check['ok'] else 'FAIL'}  {pop}: {check}")
    print(f"{'PASS' if result['passed'] else 'FAIL'}: {rule}")
    figures = {"benchmark": "ray_routing", "config": asdict(cfg), "pass_rule": rule}
    print(f"wrote {write_json(json_out, {**figures, 'runs': rows, **result})}")
    return {**figures, "runs": rows, **result}


def _ingress_ratios(rows: list[dict]) -> None:
    """On each draw's Ray one-replica row: its tokens/s over `lorafleet serve`'s, and the
    difference of their TTFT p50 (the Ray ingress's cost)."""
    for pop in {r["popularity"] for r in rows}:
        mine = [r for r in rows if r["popularity"] == pop and "error" not in r]
        ray = next((r for r in mine if r["layout"] == "1x2" and r["routing"] != "serve"), None)
        serve = next((r for r in mine if r["routing"] == "serve"), None)
        if ray and serve:
            ray["ray_vs_serve_tokens_per_s"] = ray["tokens_per_s"] / serve["tokens_per_s"]
            ray["ray_minus_serve_ttft_p50"] = ray["ttft_p50"] - serve["ttft_p50"]


if __name__ == "__main__":  # FleetProcess's child
    serve_fleet(sys.argv[1])
