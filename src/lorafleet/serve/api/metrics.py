"""Prometheus metrics of one server (its own registry, so several apps in a process never mix)."""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lorafleet.serve.backend import ServingBackend
from lorafleet.serve.registry import AdapterRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector:
    """Reads gauges and the registry's counters at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, backend: ServingBackend, registry: AdapterRegistry | None):
        self.backend, self.registry = backend, registry

    def collect(self):
        stats = self.backend.stats()
        for name, key, doc in (
            ("lorafleet_queue_depth", "waiting", "Requests waiting to be admitted."),
            ("lorafleet_running_requests", "running", "Requests decoding now."),
            ("lorafleet_kv_free_slots", "kv_free_slots", "Free KV-cache sequence slots."),
            ("lorafleet_resident_adapters", "adapters_loaded", "Adapters in engine slots."),
        ):
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for name, key, doc in (  # not every backend reports these
            ("lorafleet_kv_used_slots", "kv_used_slots", "KV-cache sequence slots in use."),
            ("lorafleet_adapter_slots", "adapter_slots", "Adapter slots in all."),
            (
                "lorafleet_adapter_slots_in_use",
                "adapters_in_use",
                "Resident adapters a running request uses now (0 when idle).",
            ),
        ):
            if stats.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, kind, doc in (  # the engine's prefix cache (serve/prefix_cache.py)
            ("hits", CounterMetricFamily, "Requests that reused a cached prompt prefix."),
            ("misses", CounterMetricFamily, "Requests that looked a prefix up and found none."),
            ("hit_tokens", CounterMetricFamily, "Prompt tokens reused instead of prefilled."),
            ("bytes", GaugeMetricFamily, "Bytes of prompt KV the prefix cache holds."),
        ):
            if stats.get(f"prefix_cache_{key}") is not None:
                value = stats[f"prefix_cache_{key}"]
                yield kind(f"lorafleet_prefix_cache_{key}", doc, value=value)
        if stats.get("replicas") is not None:  # a backend of replicas (serve/ray): each one
            yield from _replica_metrics(stats["replicas"])
        if self.registry is None:
            return
        if self.registry.can_merge:
            yield from _merge_cache_metrics(self.registry.merged.stats())
        # A backend of replicas reports their registries' counters, summed (serve/ray).
        reg = {**self.registry.stats(), **stats.get("registry", {})}
        yield GaugeMetricFamily(
            "lorafleet_adapter_cpu_cache_mb",
            "CPU adapter cache size (MB).",
            value=reg.get("cpu_mb", 0.0),
        )
        yield from _tier_metrics(self.registry, reg)
        yield from _entry_metrics(self.registry)
        for key, doc in (
            ("hits", "Requests whose adapter was resident."),
            ("cpu_hits", "Adapter loads served from the CPU cache."),
            ("misses", "Requests whose adapter was not resident."),
            ("loads", "Adapters read from disk."),
            ("failures", "Adapter loads that failed."),
            ("evictions_slot", "Adapters evicted from engine slots."),
            ("evictions_cpu", "Adapters evicted from the CPU cache."),
        ):
            yield CounterMetricFamily(f"lorafleet_adapter_cache_{key}", doc, value=reg.get(key, 0))


def _replica_metrics(rows: list[dict]):
    """Per replica of a backend of replicas (serve/ray/wire.sum_stats): how many are live,
    and each one's adapter loads (adapters put in its slots), requests and running ones,
    labelled by replica, pid and node (the IP of the Ray node it runs on)."""
    yield GaugeMetricFamily("lorafleet_replicas", "Live replicas.", value=len(rows))
    for key, kind, doc in (
        ("adapter_loads", CounterMetricFamily, "Adapters put in a replica's slots."),
        ("requests", CounterMetricFamily, "Requests a replica got."),
        ("running", GaugeMetricFamily, "Requests decoding on a replica now."),
    ):
        family = kind(f"lorafleet_replica_{key}", doc, labels=["replica", "pid", "node"])
        for row in rows:
            labels = [str(row["replica"]), str(row["pid"]), str(row.get("node") or "")]
            family.add_metric(labels, row.get(key) or 0)
        yield family


def _tier_metrics(registry: AdapterRegistry, reg: dict):
    """The CPU tier in bytes against its budget, per-tier hit rates, cold-load time histogram."""
    for key, doc in (
        ("cpu_bytes", "Adapter tensor bytes held in the CPU tier."),
        ("cpu_budget_bytes", "The CPU tier's byte budget (--cpu-cache-bytes)."),
        ("cpu_adapters", "Adapters held in the CPU tier."),
        ("loading", "Adapter loads in flight."),
        ("staged", "Adapters loaded and waiting for a free slot."),
        ("slot_hit_rate", "Share of adapter look-ups found resident."),
        ("cpu_hit_rate", "Share of slot loads served from CPU memory."),
    ):
        if reg.get(key) is not None:
            yield GaugeMetricFamily(f"lorafleet_adapter_{key}", doc, value=reg[key])
    buckets, total = registry.load_times.histogram()
    family = HistogramMetricFamily(
        "lorafleet_adapter_cold_load_seconds",
        "Disk reads of adapters: read, check, stage (seconds).",
    )
    family.add_metric([], buckets, total)
    yield family


def _entry_metrics(registry: AdapterRegistry):
    """Entries of the adapters directory that failed their checks (rescanned first, unless a
    scan runs now): how many, and one line each labelled with its kind and reason."""
    registry.rescan(blocking=False)
    bad = registry.unavailable()
    yield GaugeMetricFamily(
        "lorafleet_adapters_unavailable",
        "Entries of the adapters directory that failed their checks (see /admin/adapters).",
        value=len(bad),
    )
    family = GaugeMetricFamily(
        "lorafleet_adapter_unavailable",
        "1 for each unavailable entry of the adapters directory, with its kind and reason.",
        labels=["adapter", "kind", "reason"],
    )
    for entry in bad:
        family.add_metric([entry.name, entry.kind, entry.reason or ""], 1)
    yield family


def _merge_cache_metrics(stats: dict):
    yield GaugeMetricFamily(
        "lorafleet_merged_adapter_cache_mb",
        "Merged (ties / dare) virtual adapters in memory (MB).",
        value=stats["mb"],
    )
    yield GaugeMetricFamily(
        "lorafleet_merged_adapters", "Merged virtual adapters cached.", value=stats["adapters"]
    )
    yield CounterMetricFamily(
        "lorafleet_merged_adapter_merges", "Merges computed.", value=stats["merges"]
    )
    yield CounterMetricFamily(
        "lorafleet_merged_adapter_evictions",
        "Merged adapters dropped from the cache.",
        value=stats["evictions"],
    )


class Metrics:
    """Counters and histograms the routes update; `render()` is the /metrics body."""

    def __init__(self, backend: ServingBackend, registry: AdapterRegistry | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorafleet_requests",
            "Requests by endpoint, adapter and status.",
            ["endpoint", "adapter", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lorafleet_prompt_tokens", "Prompt tokens in.", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "lorafleet_generated_tokens", "Tokens generated.", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time to first token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Set by the app (serve/api/drain.py): read at scrape time.
        self.in_flight = Gauge(
            "lorafleet_http_requests_in_flight",
            "HTTP requests being answered (streams until their last event; not /health, /metrics).",
            registry=r,
        )
        self.draining = Gauge(
            "lorafleet_draining", "1 while the server drains (SIGTERM), else 0.", registry=r
        )
        # RSS, CPU time, open files of this process (what a soak watches for growth).
        ProcessCollector(registry=r)
        r.register(_EngineCollector(backend, registry))
        self._series: dict[str, set[tuple[str, str]]] = {}  # adapter -> (endpoint, status)
        self._lock = threading.Lock()  # finished() on the event loop, forget() in a worker

    def finished(self, endpoint: str, adapter: str, status: int, stream=None) -> None:
        self.requests.labels(endpoint, adapter, str(status)).inc()
        with self._lock:
            self._series.setdefault(adapter, set()).add((endpoint, str(status)))
        if stream is None:
            return
        self.prompt_tokens.labels(adapter).inc(stream.prompt_tokens)
        self.generated_tokens.labels(adapter).inc(stream.completion_tokens)
        if stream.first_token_at is not None:
            self.ttft.labels(adapter).observe(stream.first_token_at - stream.started)
            if stream.completion_tokens > 1 and stream.last_token_at is not None:
                span = stream.last_token_at - stream.first_token_at
                per = span / (stream.completion_tokens - 1)
                self.tpot.labels(adapter).observe(per)

    def forget(self, adapter: str) -> None:
        """Drop every series labelled with `adapter` (deleted): a server whose adapters come
        and go keeps no series for the ones gone, so /metrics and memory stay bounded."""
        with self._lock:
            series = self._series.pop(adapter, set())
        for endpoint, status in series:
            with contextlib.suppress(KeyError):
                self.requests.remove(endpoint, adapter, status)
        for metric in (self.prompt_tokens, self.generated_tokens, self.ttft, self.tpot):
            with contextlib.suppress(KeyError):
                metric.remove(adapter)

    def render(self) -> bytes:
        return generate_latest(self.registry)
