"""Soak: a mixed load against `lorafleet serve` for M minutes, then a pass rule.

The load: C client workers, each sending one request after another, picked at random from a
mix: streamed and non-streamed completions and chats, streams the client drops after a few
tokens (a disconnect, so the server must free what the request held), per-request mixtures,
admin uploads each followed by a request and a delete, and bad requests (each must get a
4xx). The server gets few adapter slots (`--slots 2`) and more adapters than that, so
adapters are evicted and loaded all along. A sampler reads /metrics every few seconds: the
server's RSS (process_resident_memory_bytes), requests running and waiting, KV slots and
adapter slots in use.

The report, per window of `window_s` seconds: requests by class (2xx, 4xx, 5xx, client
errors: a transport failure or a stream that ended without `[DONE]`; intended cancels apart),
p50 / p99 latency of the successful requests, p99 time to first token of the streams, and the
RSS at the window's end. The pass rule: no 5xx (an error event inside a stream counts as
one), no client errors, no unexpected status (a good request refused, a bad one accepted), the
RSS at the end of the last window at most `max_rss_growth` above the RSS at the end of the
first (the warm-up), and, within `idle_timeout_s` after the load, the server idle again: no
request running or waiting, no KV slot, adapter slot pinned or HTTP request in flight, no
adapter load pending. A server the soak started must then exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.bench.soak_config import SoakConfig
from lorafleet.bench.streaming import pct
from lorafleet.errors import LorafleetError

PROMPTS = (
    "The film was a delight from start to finish.",
    "Tell me a joke about cats and dogs please",
    "Two plus two is",
    "Once upon a time, in a land far away, there lived a",
    "Question: what is the capital of France? Answer:",
)
# Operation -> weight: what each worker picks from, one request after another.
MIX = {
    "stream": 30,
    "complete": 20,
    "chat": 10,
    "cancel": 10,
    "mixture": 10,
    "bad": 12,
    "upload": 8,
}
UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")
IDLE_GAUGES = {  # /metrics gauge -> what it counts; all must read 0 once the load is over
    "lorafleet_running_requests": "requests running",
    "lorafleet_queue_depth": "requests waiting",
    "lorafleet_kv_used_slots": "KV slots in use",
    "lorafleet_adapter_slots_in_use": "adapter slots pinned by a request",
    "lorafleet_http_requests_in_flight": "HTTP requests in flight",
    "lorafleet_adapter_loading": "adapter loads pending",
}
CLASSES = ("2xx", "4xx", "5xx", "client_error", "cancelled")


@dataclass
class Result:
    """One request: when it began (seconds into the load), what it was, how it ended."""

    t: float
    op: str
    outcome: str  # one of CLASSES
    latency: float
    ttft: float | None = None
    unexpected: str | None = None  # why the status was not the one this request must get
    status: int | None = None


@dataclass
class Load:
    """What the workers share: the server, names to ask for, and the results."""

    url: str
    base_name: str
    adapters: list[str]
    headers: dict
    admin_headers: dict | None
    upload_files: dict | None  # filename -> bytes of the adapter uploads send
    upload_root: Path | None  # the served adapters dir, when the soak owns it
    max_tokens: int
    t0: float = field(default_factory=time.monotonic)
    results: list[Result] = field(default_factory=list)
    uploads: int = 0


# -- the workers ---------------------------------------------------------------------------------


def _classify(status: int) -> str:
    return f"{status // 100}xx" if status // 100 in (2, 4, 5) else "5xx"


def _why(op: str, r) -> str:
    """What an answer said, for the report's list of unexpected statuses."""
    try:
        message = r.json()["error"]["message"]
    except Exception:
        message = r.text
    return f"{op}: HTTP {r.status_code} {message[:160]}"


def _reply(load: Load, op: str, began: float, r, expect: str = "2xx") -> None:
    _record(load, op, began, r.status_code, expect=expect, why=_why(op, r))


def _record(load: Load, op, began, status, ttft=None, expect="2xx", why=None) -> None:
    outcome = _classify(status) if isinstance(status, int) else status
    unexpected = None
    if outcome in ("2xx", "4xx") and outcome != expect:
        unexpected = why or f"{op}: HTTP {status}, expected {expect}"
    load.results.append(
        Result(
            began - load.t0,
            op,
            outcome,
            time.monotonic() - began,
            ttft,
            unexpected,
            status if isinstance(status, int) else None,
        )
    )


async def _stream(http, load: Load, rng: random.Random, op: str) -> None:
    """A streamed completion or chat, read to `[DONE]` (or, for `cancel`, dropped early)."""
    chat = rng.random() < 0.4
    model = rng.choice([load.base_name, *load.adapters])
    cancel_after = rng.randint(1, 3) if op == "cancel" else None
    body = {"model": model, "max_tokens": rng.randint(4, load.max_tokens), "stream": True}
    body["ignore_eos"] = cancel_after is not None  # a cancel needs a stream to cut
    if cancel_after is not None:
        body["max_tokens"] = load.max_tokens * 4
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    began, ttft, events, done, failed = time.monotonic(), None, 0, False, False
    async with http.stream("POST", load.url + path, json=body, headers=load.headers) as r:
        if r.status_code != 200:
            await r.aread()
            _reply(load, op, began, r)
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            events += 1
            if ttft is None:
                ttft = time.monotonic() - began
            if '"error"' in data and "error" in json.loads(data):
                failed = True  # an error event inside a stream: the server failed it
            if cancel_after is not None and events >= cancel_after:
                break  # leaving the block closes the connection: a client disconnect
    if failed:
        _record(load, op, began, 500, ttft)
    elif cancel_after is not None and not done:
        _record(load, op, began, "cancelled", ttft)
    elif not done:
        _record(load, op, began, "client_error", ttft)
    else:
        _record(load, op, began, 200, ttft)


async def _complete(http, load: Load, rng: random.Random, op: str) -> None:
    """A non-streamed completion (sometimes n=2), chat, or two-adapter mixture."""
    body: dict = {"max_tokens": rng.randint(1, load.max_tokens)}
    path = "/v1/completions"
    if op == "mixture":
        a, b = rng.sample(load.adapters, 2)
        w = round(rng.uniform(0.2, 0.8), 2)
        if rng.random() < 0.5:
            body["model"] = f"mix:{a}*{w}+{b}*{round(1 - w, 2)}"
        else:
            body["model"] = load.base_name
            body["adapters"] = [{"name": a, "weight": w}, {"name": b, "weight": 1 - w}]
    else:
        body["model"] = rng.choice([load.base_name, *load.adapters])
    if op == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
        body["n"] = rng.choice([1, 1, 2])
    began = time.monotonic()
    r = await http.post(load.url + path, json=body, headers=load.headers)
    _reply(load, op, began, r)


def _bad_requests(load: Load) -> list[tuple[str, dict]]:
    """(path, httpx keyword arguments) of requests that must each get a 4xx."""
    h = load.headers
    a = load.adapters[0]
    return [
        ("/v1/completions", {"json": {"model": "no-such-adapter", "prompt": "x"}, "headers": h}),
        ("/v1/completions", {"json": {"model": a, "prompt": "x", "max_tokens": -1}, "headers": h}),
        ("/v1/completions", {"json": {"model": a, "prompt": [10**9]}, "headers": h}),
        ("/v1/completions", {"json": {"model": a, "prompt": [1] * 5000}, "headers": h}),
        ("/v1/completions", {"json": {"model": a, "prompt": "x", "n": 10_000}, "headers": h}),
        (
            "/v1/completions",
            {"json": {"model": f"mix:{a}*0.5+nope*0.5", "prompt": "x"}, "headers": h},
        ),
        ("/v1/chat/completions", {"json": {"model": a, "messages": "hi"}, "headers": h}),
        (
            "/v1/completions",
            {"content": b"{not json", "headers": {**h, "Content-Type": "application/json"}},
        ),
    ]


async def _bad(http, load: Load, rng: random.Random, op: str) -> None:
    path, kw = rng.choice(_bad_requests(load))
    began = time.monotonic()
    r = await http.post(load.url + path, **kw)
    _reply(load, op, began, r, expect="4xx")


async def _upload(http, load: Load, rng: random.Random, op: str) -> None:
    """Upload a new adapter, ask it once, delete it (and its files, when the dir is ours)."""
    if load.admin_headers is None or load.upload_files is None:
        return await _complete(http, load, rng, "complete")
    load.uploads += 1
    name = f"soak-up-{os.getpid()}-{load.uploads}"
    files = {k: (k, v, "application/octet-stream") for k, v in load.upload_files.items()}
    began = time.monotonic()
    r = await http.post(
        load.url + "/admin/adapters", data={"name": name}, files=files, headers=load.admin_headers
    )
    _reply(load, "upload", began, r)
    if r.status_code != 201:
        return None
    body = {"model": name, "prompt": rng.choice(PROMPTS), "max_tokens": 4}
    began = time.monotonic()
    r = await http.post(load.url + "/v1/completions", json=body, headers=load.headers)
    _reply(load, "uploaded", began, r)
    began = time.monotonic()
    r = await http.delete(load.url + f"/admin/adapters/{name}", headers=load.admin_headers)
    _reply(load, "delete", began, r)
    if r.status_code == 200 and load.upload_root is not None:
        shutil.rmtree(load.upload_root / name, ignore_errors=True)
    return None


OPS = {
    "stream": _stream,
    "cancel": _stream,
    "complete": _complete,
    "chat": _complete,
    "mixture": _complete,
    "bad": _bad,
    "upload": _upload,
}


async def _worker(http, load: Load, seed: int, deadline: float) -> None:
    import httpx

    rng = random.Random(seed)
    ops, weights = list(MIX), list(MIX.values())
    while time.monotonic() < deadline:
        op = rng.choices(ops, weights)[0]
        began = time.monotonic()
        try:
            await OPS[op](http, load, rng, op)
        except httpx.HTTPError as exc:
            _record(load, op, began, "client_error", why=f"{op}: {type(exc).__name__}")
            await asyncio.sleep(0.5)  # a server gone away: no tight loop of failures


# -- /metrics ------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page, name -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = sample.value
    return out


async def _scrape(http, load: Load) -> dict[str, float]:
    """/metrics as {name: value}; {} when the server does not answer it (a dead server then
    fails the idle check, its gauges missing)."""
    import httpx

    try:
        r = await http.get(load.url + "/metrics", headers=load.admin_headers or load.headers)
    except httpx.HTTPError:
        return {}
    return parse_metrics(r.text) if r.status_code == 200 else {}


async def _sampler(http, load: Load, every_s: float, stop: asyncio.Event, out: list) -> None:
    while not stop.is_set():
        got = await _scrape(http, load)
        out.append({"t": time.monotonic() - load.t0, **_gauges(got)})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def _gauges(metrics: dict[str, float]) -> dict:
    keep = {"rss_bytes": metrics.get("process_resident_memory_bytes")}
    keep.update({name: metrics.get(name) for name in IDLE_GAUGES})
    keep["resident_adapters"] = metrics.get("lorafleet_resident_adapters")
    return keep


async def _idle(http, load: Load, timeout_s: float) -> dict:
    """Poll /metrics until every IDLE_GAUGES reads 0 (or the timeout); the last reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = _gauges(await _scrape(http, load))
        busy = {k: got[k] for k in IDLE_GAUGES if got.get(k)}
        missing = [k for k in IDLE_GAUGES if got.get(k) is None]
        if (not busy and not missing) or time.monotonic() > deadline:
            return {"gauges": got, "busy": busy, "missing": missing}
        await asyncio.sleep(0.5)


async def run_load(load: Load, cfg: SoakConfig) -> tuple[list[dict], dict]:
    """The workers for `cfg.minutes`, the sampler beside them; then the idle check."""
    import httpx

    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        load.t0 = time.monotonic()
        deadline = load.t0 + cfg.minutes * 60
        stop, samples = asyncio.Event(), []
        sampler = asyncio.create_task(_sampler(http, load, cfg.sample_s, stop, samples))
        workers = [
            _worker(http, load, cfg.seed * 1000 + i, deadline) for i in range(cfg.concurrency)
        ]
        await asyncio.gather(*workers)
        # One more sample at the load's end: the last window's RSS.
        samples.append({"t": time.monotonic() - load.t0, **_gauges(await _scrape(http, load))})
        stop.set()
        await sampler
        idle = await _idle(http, load, cfg.idle_timeout_s)
    return samples, idle


# -- the report ----------------------------------------------------------------------------------


def windows(results: list[Result], samples: list[dict], window_s: float, total_s: float) -> list:
    """Per window: counts by class, unexpected statuses, latency p50/p99 (2xx, seconds), p99
    TTFT of streams, and the RSS at the window's end (its last sample; for the last window,
    the sample taken when the load ended)."""
    n = max(1, -(-int(total_s * 1000) // int(window_s * 1000)))  # ceil, in ms
    rows = []
    for w in range(n):
        lo, hi = w * window_s, (w + 1) * window_s
        mine = [r for r in results if lo <= r.t < hi]
        ok = [r.latency for r in mine if r.outcome == "2xx"]
        ttft = [r.ttft for r in mine if r.outcome == "2xx" and r.ttft is not None]
        until = hi if w < n - 1 else float("inf")
        in_window = [s for s in samples if s["t"] < until and s.get("rss_bytes")]
        rows.append(
            {
                "window": w + 1,
                "from_s": lo,
                "requests": len(mine),
                **{c: sum(1 for r in mine if r.outcome == c) for c in CLASSES},
                "unexpected": sum(1 for r in mine if r.unexpected),
                "p50_ms": _ms(pct(ok, 50)),
                "p99_ms": _ms(pct(ok, 99)),
                "ttft_p99_ms": _ms(pct(ttft, 99)),
                "rss_mb": in_window[-1]["rss_bytes"] / 2**20 if in_window else None,
            }
        )
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def checks(rows: list[dict], idle: dict, max_rss_growth: float, exit_code) -> dict:
    """The pass rule, each part with its figure: {name: {"ok": bool, "value": ...}}."""
    total = {c: sum(r[c] for r in rows) for c in (*CLASSES, "unexpected")}
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = (last - first) / first if first and last else None
    out = {
        "no_5xx": {"ok": total["5xx"] == 0, "value": total["5xx"]},
        "no_client_errors": {"ok": total["client_error"] == 0, "value": total["client_error"]},
        "no_unexpected_status": {"ok": total["unexpected"] == 0, "value": total["unexpected"]},
        "rss_growth_after_warmup": {
            "ok": growth is not None and growth < max_rss_growth,
            "value": growth,
            "limit": max_rss_growth,
        },
        "idle_after_load": {
            "ok": not idle["busy"] and not idle["missing"],
            "value": idle["busy"] or (f"missing: {idle['missing']}" if idle["missing"] else 0),
        },
    }
    if exit_code != "n/a":
        out["exit_0_on_sigterm"] = {"ok": exit_code == 0, "value": exit_code}
    return out


# -- the server ----------------------------------------------------------------------------------


def _prepare(cfg: SoakConfig, scratch: Path) -> tuple[str, Path, dict]:
    """The base to serve (a tiny one written here for "tiny"), the adapters dir with random
    adapters a0..aN-1, and the upload's files; adapters carry the base's fingerprint."""
    import torch

    from lorafleet.adapters import write_adapter
    from lorafleet.bench.engine import random_adapters
    from lorafleet.models import load_base
    from lorafleet.models.tiny import default_tokenizer, save_tiny_base

    torch.manual_seed(cfg.seed)
    base = cfg.base
    if base == "tiny":
        base = str(save_tiny_base(scratch / "base", seed=0, tokenizer=default_tokenizer()))
    loaded = load_base(base)
    made = random_adapters(loaded.model, cfg.adapters + 1, cfg.rank)
    root = scratch / "adapters"
    for i, adapter in enumerate(made):
        adapter.meta["base_fingerprint"] = loaded.fingerprint
        write_adapter(root / f"a{i}" if i < cfg.adapters else scratch / "upload", adapter)
    # What POST /admin/adapters takes (write_adapter may add lorafleet's metadata file).
    files = {n: (scratch / "upload" / n).read_bytes() for n in UPLOAD_FILES}
    return base, root, files


def _start_server(cfg: SoakConfig, base: str, root: Path, scratch: Path):
    from lorafleet.bench.serve import ServerProcess

    admin, key = "soak-admin-" + os.urandom(8).hex(), "soak-" + os.urandom(8).hex()
    auth = scratch / "auth.json"
    auth.write_text(json.dumps({"admin_keys": [admin], "tenants": {"soak": {"keys": [key]}}}))
    settings = {
        "auth": auth,
        "max_adapters": cfg.slots,
        "max_rank": cfg.rank,
        "max_seq_len": 256,
        "threads": cfg.threads,
    }
    server = ServerProcess(base, root, settings, "base")
    server.wait_ready()
    return server, key, admin


def _stop(server) -> tuple[int | str, str]:
    """SIGTERM (a drain), then the exit code and the end of the server's log."""
    import subprocess

    server.proc.terminate()
    try:
        code = server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        code = "killed after 120 s"
    server.log.seek(0)
    tail = server.log.read().decode(errors="replace")[-3000:]
    server.log.close()
    return code, tail


def run(cfg: SoakConfig, json_out: str | Path | None = None) -> dict:
    """The soak; prints the table and the checks, writes `json_out`; "passed" in the result."""
    from lorafleet.bench import print_table, write_json

    with tempfile.TemporaryDirectory(prefix="lorafleet-soak-") as tmp:
        scratch = Path(tmp)
        server, exit_code, log_tail = None, "n/a", ""
        if cfg.url is None:
            base, root, files = _prepare(cfg, scratch)
            print(
                f"soak: starting lorafleet serve --base {cfg.base} ({cfg.slots} slots)", flush=True
            )
            server, key, admin = _start_server(cfg, base, root, scratch)
            url, upload_root = server.url, root
            names = [f"a{i}" for i in range(cfg.adapters)]
        else:
            url, key, admin, files, upload_root = (
                cfg.url.rstrip("/"),
                cfg.api_key,
                cfg.admin_key,
                None,
                None,
            )
            names = _remote_adapters(url, key)  # no uploads: nothing here to send
            _check_metrics(url, admin or key)
        load = Load(
            url=url,
            base_name="base" if server is not None else _remote_base(url, key),
            adapters=names,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            admin_headers={"Authorization": f"Bearer {admin}"} if admin else None,
            upload_files=files,
            upload_root=upload_root,
            max_tokens=cfg.max_tokens,
        )
        print(
            f"soak: {cfg.minutes:g} min, {cfg.concurrency} workers, {len(names)} adapters, "
            f"windows of {cfg.window_s:g} s against {url}",
            flush=True,
        )
        try:
            samples, idle = asyncio.run(run_load(load, cfg))
        finally:
            if server is not None:
                exit_code, log_tail = _stop(server)
    rows = windows(load.results, samples, cfg.window_s, cfg.minutes * 60)
    verdict = checks(rows, idle, cfg.max_rss_growth, exit_code)
    passed = all(c["ok"] for c in verdict.values())
    print_table(
        rows,
        ["window", "requests", *CLASSES, "unexpected", "p50_ms", "p99_ms", "ttft_p99_ms", "rss_mb"],
    )
    for name, c in verdict.items():
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {name}: {c['value']}")
    reasons = sorted({r.unexpected for r in load.results if r.unexpected})
    for reason in reasons[:10]:
        print(f"  unexpected: {reason}")
    if not passed and log_tail:
        print("the server's log, last lines:\n" + log_tail)
    figures = {
        "config": asdict(cfg) | {"api_key": None, "admin_key": None},
        "windows": rows,
        "checks": verdict,
        "passed": passed,
        "idle": idle,
        "samples": samples,
        "by_op": _by_op(load.results),
        "unexpected": reasons,
    }
    if json_out is not None:
        print(f"wrote {write_json(json_out, figures)}")
    return figures


def _by_op(results: list[Result]) -> dict:
    out: dict[str, dict] = {}
    for r in results:
        row = out.setdefault(r.op, dict.fromkeys(CLASSES, 0))
        row[r.outcome] += 1
    return out


def _get(url: str, path: str, key: str | None):
    """GET url + path with `key`; a one-line LorafleetError when the server cannot be reached."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.get(url + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise LorafleetError(f"--url {url}: cannot reach it ({type(exc).__name__})") from None


def _models(url: str, key: str | None) -> list[dict]:
    """GET /v1/models' entries ([] for any other answer: the caller names what is missing)."""
    r = _get(url, "/v1/models", key)
    try:
        return r.json()["data"] if r.status_code == 200 else []
    except (ValueError, KeyError, TypeError):
        return []


def _remote_adapters(url: str, key: str | None) -> list[str]:
    names = [m["id"] for m in _models(url, key) if m.get("parent")]
    if len(names) < 2:
        raise LorafleetError(
            f"{url} serves {len(names)} adapter(s) to this key; the soak mixes two "
            "(check --url and --api-key)"
        )
    return names


def _check_metrics(url: str, key: str | None) -> None:
    r = _get(url, "/metrics", key)
    if r.status_code != 200:
        raise LorafleetError(f"{url}/metrics answered {r.status_code}: pass --admin-key")
    if "process_resident_memory_bytes" not in r.text:
        raise LorafleetError(f"{url}/metrics has no process_resident_memory_bytes (RSS)")


def _remote_base(url: str, key: str | None) -> str:
    base = next((m["id"] for m in _models(url, key) if not m.get("parent")), None)
    if base is None:
        raise LorafleetError(f"{url}/v1/models lists no base model")
    return base
