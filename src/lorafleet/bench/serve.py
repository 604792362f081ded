"""Benchmark: N concurrent streaming HTTP clients against `lorafleet serve`, beside the engine
in-process on the very same requests: total tokens/s, time to first token (TTFT) and time per
output token (TPOT), p50 and p99.

Both sides get one base, M adapters (request i uses adapter i % M; with `--base-share` some
requests use the base), the same prompt token ids, sampling and engine sizes. The server runs
as its own process (`python -m lorafleet.cli serve`), the clients are asyncio streams in this
one (httpx, SSE); the in-process figure runs first, in this process, with the server not yet
started, so the two never share the cores. While the largest N runs, `/health` is polled and
its worst latency reported (the server must stay responsive under load)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.bench.streaming import in_process, plan, sse_events, summarise
from lorafleet.errors import LorafleetError

HEALTH_POLL_S = 0.1


# -- over HTTP -----------------------------------------------------------------------------------


async def _client(http, url: str, model: str, r: dict, t0: float) -> dict:
    body = {
        "model": model,
        "prompt": r["prompt"],
        "max_tokens": r["max_tokens"],
        "temperature": r["temperature"],
        "seed": r["seed"],
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = {"ttft": None, "tokens": 0, "last": None}
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        async for event in sse_events(resp, "lorafleet"):
            now = time.perf_counter() - t0
            if event.get("choices") and event["choices"][0].get("text"):
                rec["ttft"] = now if rec["ttft"] is None else rec["ttft"]
                rec["last"] = now
            if event.get("usage"):
                rec["tokens"] = event["usage"]["completion_tokens"]
    return rec


async def _health_poller(http, url: str, stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        (await http.get(url + "/health")).raise_for_status()
        worst[0] = max(worst[0], time.perf_counter() - began)
        await asyncio.sleep(HEALTH_POLL_S)


async def over_http(url: str, base_name: str, requests: list[dict], watch_health: bool) -> dict:
    """Every request as a concurrent streaming client; returns the summary (+ health latency)."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        stop, worst = asyncio.Event(), [0.0]
        poller = (
            asyncio.create_task(_health_poller(http, url, stop, worst)) if watch_health else None
        )
        t0 = time.perf_counter()
        records = await asyncio.gather(
            *(_client(http, url, r["adapter"] or base_name, r, t0) for r in requests)
        )
        wall = time.perf_counter() - t0
        stop.set()
        if poller is not None:
            await poller
    out = summarise(records, wall)
    if watch_health:
        out["health_worst_s"] = worst[0]
    return out


class ServerProcess:
    """`lorafleet serve` as a child process on a free loopback port."""

    def __init__(self, base: str, adapters_dir: Path, settings: dict, model_name: str):
        from lorafleet.serve.api.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "lorafleet.cli",
            "serve",
            "--base",
            base,
            "--adapters",
            str(adapters_dir),
            "--port",
            str(self.port),
            "--model-name",
            model_name,
        ]
        for key, value in settings.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-800:]
                raise LorafleetError(f"the server exited with code {self.proc.returncode}: {tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LorafleetError(f"the server did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# -- the run -------------------------------------------------------------------------------------


def _write_adapters(base, count: int, rank: int, root: Path) -> list[str]:
    from lorafleet.adapters import write_adapter
    from lorafleet.bench.engine import random_adapters

    names = [f"a{i}" for i in range(count)]
    for name, adapter in zip(names, random_adapters(base.model, count, rank), strict=True):
        adapter.meta["base_fingerprint"] = base.fingerprint
        write_adapter(root / name, adapter)
    return names


def _adapter_names(loaded, adapters_dir, adapters: int, rank: int, scratch: str):
    if adapters_dir is None:
        root = Path(scratch)
        return _write_adapters(loaded, adapters, rank, root), root
    root = Path(adapters_dir)
    names = sorted(p.parent.name for p in root.glob("*/adapter_config.json"))
    if not names:
        raise LorafleetError(f"--adapters-dir {root}: no adapter directories")
    return names, root


def _best(old: dict | None, new: dict) -> dict:
    return new if old is None or new["tokens_per_s"] > old["tokens_per_s"] else old


def run(
    base: str = "default",
    clients: tuple[int, ...] = (1, 8, 32, 64),
    adapters: int = 4,
    base_share: bool = False,
    base_only: bool = False,
    adapters_dir: str | Path | None = None,
    prompt_tokens: int = 32,
    new_tokens: int = 48,
    rank: int = 16,
    temperature: float = 0.0,
    max_batch_size: int = 64,
    reps: int = 2,
    threads: int | None = None,
    json_out: str | Path = "bench/results/serve.json",
) -> dict:
    """Each N in `clients`, `reps` times: the engine in-process, then the same requests over
    HTTP (alternating, best run of each kept, so their ratio holds under other load). The
    llama.cpp peers over HTTP: lorafleet.bench.peers_http (`bench serve --peers`)."""
    import torch

    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.models import load_base
    from lorafleet.serve.api.server import EngineSettings, build_state

    # The same torch threads on both sides (the server's own default: all cores but one).
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = load_base(base)
    loaded.model.eval()
    prompts = gsm8k_prompts(loaded.tokenizer, max(clients), prompt_tokens)
    inproc: dict[int, dict] = {}
    http: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        names, root = _adapter_names(loaded, adapters_dir, adapters, rank, scratch)
        names = [None] if base_only else names + [None] if base_share else names
        settings = {
            "max_adapters": max(1, len([n for n in names if n])),
            "max_rank": rank,
            "max_batch_size": max_batch_size,
            "max_batch_tokens": max(2048, max_batch_size * prompt_tokens),
            "max_seq_len": prompt_tokens + new_tokens + 8,
            "threads": threads,
        }
        engine_settings = EngineSettings(**{k: v for k, v in settings.items() if k != "threads"})
        state = build_state(loaded, root, settings=engine_settings)
        server = ServerProcess(base, root, settings, "base")
        try:
            server.wait_ready()
            warm = plan(len(names), names, prompts, 4, temperature)
            in_process(state.backend, warm)
            asyncio.run(over_http(server.url, "base", warm, False))
            for n in clients:
                reqs = plan(n, names, prompts, new_tokens, temperature)
                for rep in range(reps):
                    print(f"{n} clients, run {rep + 1}/{reps}: in-process, HTTP", flush=True)
                    inproc[n] = _best(inproc.get(n), in_process(state.backend, reqs))
                    watch = n == max(clients)
                    http[n] = _best(
                        http.get(n), asyncio.run(over_http(server.url, "base", reqs, watch))
                    )
        finally:
            server.stop()
            state.registry.close()
            state.backend.close()
    return _report(
        base, clients, names, inproc, http, temperature, prompt_tokens, new_tokens, json_out
    )


def _report(
    base, clients, names, inproc, http, temperature, prompt_tokens, new_tokens, json_out
) -> dict:
    rows, figures = [], {}
    for n in clients:
        ratio = http[n]["tokens_per_s"] / inproc[n]["tokens_per_s"]
        figures[str(n)] = {"in_process": inproc[n], "http": http[n], "http_vs_in_process": ratio}
        sides = [("in-process", inproc[n]), ("http", http[n])]
        for where, fig in sides:
            rows.append(
                {
                    "clients": n,
                    "where": where,
                    "tokens": fig["tokens"],
                    "tok_per_s": fig["tokens_per_s"],
                    "ttft_p50": fig["ttft_p50"],
                    "ttft_p99": fig["ttft_p99"],
                    "tpot_p50": fig["tpot_p50"],
                    "tpot_p99": fig["tpot_p99"],
                    "http/in-proc": ratio if where == "http" else None,
                }
            )
    print_table(
        rows,
        [
            "clients",
            "where",
            "tokens",
            "tok_per_s",
            "ttft_p50",
            "ttft_p99",
            "tpot_p50",
            "tpot_p99",
            "http/in-proc",
        ],
    )
    worst = http[max(clients)].get("health_worst_s")
    print(f"/health worst latency during the {max(clients)}-client run: {worst:.3f} s")
    result = {
        "benchmark": "serve",
        "base": base,
        "adapters": [n or "base" for n in names],
        "temperature": temperature,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "clients": figures,
        "health_worst_s": worst,
    }
    print(f"wrote {write_json(json_out, result)}")
    return result
