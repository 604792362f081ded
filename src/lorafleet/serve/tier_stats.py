"""The adapter registry's counters per tier and its cold-load times (for stats() and /metrics)."""

from __future__ import annotations

import bisect
import threading
from collections import deque

COUNTERS = ("hits", "cpu_hits", "misses", "loads", "evictions_cpu", "evictions_slot", "failures")
# Seconds; a cold load (disk read + checks + staging) of a small adapter takes milliseconds.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoadTimes:
    """Cold-load durations: cumulative histogram buckets (Prometheus' layout) and the most
    recent `keep` values for quantiles. Thread-safe."""

    def __init__(self, buckets=LOAD_BUCKETS, keep: int = 4096):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.total += seconds
            self.recent.append(seconds)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (nearest rank) of the recent loads, or None before any."""
        with self._lock:
            values = sorted(self.recent)
        if not values:
            return None
        return values[min(len(values) - 1, max(0, int(q * len(values) + 0.5) - 1))]

    def histogram(self) -> tuple[list[tuple[str, int]], float]:
        """([(upper bound, cumulative count)], sum), with "+Inf" last: HistogramMetricFamily's."""
        with self._lock:
            counts, total = list(self.counts), self.total
        bounds = [str(b) for b in self.buckets] + ["+Inf"]
        running, out = 0, []
        for bound, n in zip(bounds, counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total


def tier_rates(counters: dict) -> dict:
    """Hit rates per tier: of adapter look-ups (hits + loads into a slot), the share resident
    already; of loads into a slot, the share served from CPU memory rather than disk."""
    slot_lookups = counters["hits"] + counters["cpu_hits"] + counters["misses"]
    loads = counters["cpu_hits"] + counters["misses"]
    return {
        "slot_hit_rate": counters["hits"] / slot_lookups if slot_lookups else None,
        "cpu_hit_rate": counters["cpu_hits"] / loads if loads else None,
    }
