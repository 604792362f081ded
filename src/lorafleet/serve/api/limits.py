"""Per-tenant limits: concurrent requests and tokens per minute, answered 429 with Retry-After."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from lorafleet.errors import LorafleetError

WINDOW_S = 60.0  # "per minute": a sliding window


@dataclass(frozen=True)
class Limits:
    """One tenant's limits (None: none). `tokens_per_minute` counts prompt + completion
    tokens of every choice over a sliding 60-second window."""

    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self):
        for what in ("max_concurrent", "tokens_per_minute"):
            value = getattr(self, what)
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            if not ok or (value is not None and value < 1):
                raise LorafleetError(f"{what} must be an integer >= 1 (or null), got {value!r}")

    def __bool__(self) -> bool:
        return self.max_concurrent is not None or self.tokens_per_minute is not None


class Refused(LorafleetError):
    """A request over its tenant's limits: `status` 429 (retry after `retry_after` whole
    seconds) or 400 (it needs more tokens than a whole minute allows), and `code`."""

    def __init__(self, message: str, status: int, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


@dataclass
class Lease:
    """One admitted HTTP request of a tenant: `reserved` tokens (prompt + max_tokens of each
    choice) were charged when it was admitted; `release` (when the request is recorded)
    frees its concurrency place and corrects the charge to what its tracked streams used.
    It also stops counting as in flight once every tracked stream's engine request has
    ended (its id left `live`), so a response body that never ran cannot hold a place.
    `tenant` travels to the engine as the request's fair-share client."""

    tenant: str | None
    reserved: int
    limiter: Limiter | None = None
    streams: list = field(default_factory=list)  # (bridge.Stream, max_tokens) pairs
    entry: list | None = None  # [time, tokens] in the tenant's window
    released: bool = False
    live: Container[int] = ()  # request ids the engine still works on (RequestStreams.live)

    def track(self, stream, max_tokens: int, live: Container[int] = ()) -> None:
        self.streams.append((stream, max_tokens))
        self.live = live

    def in_flight(self) -> bool:
        if self.released:
            return False
        return not self.streams or any(s.request_id in self.live for s, _ in self.streams)

    def used(self) -> int:
        return sum(s.prompt_tokens + s.completion_tokens for s, _ in self.streams)

    def seconds_left(self, now: float) -> float | None:
        """When all its streams should be done, from their token rates so far (None: no
        rate known yet)."""
        worst = 0.0
        for stream, max_tokens in self.streams:
            if stream.done:
                continue
            if stream.completion_tokens < 1 or now <= stream.started:
                return None
            rate = stream.completion_tokens / (now - stream.started)
            worst = max(worst, (max_tokens - stream.completion_tokens) / rate)
        return worst

    def release(self) -> None:
        if not self.released and self.limiter is not None:
            self.limiter.release(self)
        self.released = True


class Limiter:
    """Concurrent requests and tokens per minute per tenant, on the event loop (a lock keeps
    it safe elsewhere too). `limits_of(tenant)` gives a tenant's Limits; a None tenant (auth
    off, or an admin key) is never limited. `clock` gives seconds (monotonic; tests may
    pass their own).

    `acquire(tenant, tokens)` admits a request that may use `tokens` (its prompt and
    max_tokens, over every choice) or raises Refused:
    - 429 `concurrency_limit_exceeded` when the tenant has `max_concurrent` requests in
      flight; Retry-After: the soonest of its in-flight requests' expected ends, from their
      token rates (at least 1 s; `fallback_retry_s` before any rate is known);
    - 400 `request_too_large` when `tokens` alone is above `tokens_per_minute`;
    - 429 `tokens_limit_exceeded` when the tokens charged in the last 60 s plus `tokens`
      are above `tokens_per_minute`; Retry-After: the whole seconds until enough charges
      leave the window (exact, unless running requests use less than they reserved, which
      only frees tokens sooner).
    A request's charge is its reservation until it ends, then what it used."""

    def __init__(
        self,
        limits_of: Callable[[str], Limits],
        fallback_retry_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits_of, self.fallback_retry_s, self.clock = limits_of, fallback_retry_s, clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, list[Lease]] = {}
        self._window: dict[str, deque[list]] = {}  # tenant -> [time, tokens] oldest first

    def in_flight(self, tenant: str) -> int:
        """The tenant's requests in flight now."""
        return sum(1 for lease in self._in_flight.get(tenant, ()) if lease.in_flight())

    def acquire(self, tenant: str | None, tokens: int) -> Lease:
        limits = self.limits_of(tenant) if tenant is not None else Limits()
        if not limits:
            return Lease(tenant, tokens)
        with self._lock:
            now = self.clock()
            leases = self._in_flight.setdefault(tenant, [])
            for ended in [lease for lease in leases if not lease.in_flight()]:
                self._settle(ended, correct=False)  # corrected when it is released
            leases = self._in_flight.setdefault(tenant, [])
            if limits.max_concurrent is not None and len(leases) >= limits.max_concurrent:
                raise Refused(
                    f"tenant {tenant} has {len(leases)} requests in flight, its limit "
                    f"(max_concurrent {limits.max_concurrent}); retry when one ends",
                    429,
                    "concurrency_limit_exceeded",
                    self._concurrency_retry(leases),
                )
            lease = Lease(tenant, tokens, self)
            tpm = limits.tokens_per_minute
            if tpm is not None:
                window = self._window.setdefault(tenant, deque())
                while window and window[0][0] <= now - WINDOW_S:
                    window.popleft()
                if tokens > tpm:
                    raise Refused(
                        f"this request may use {tokens} tokens (prompt + max_tokens per "
                        f"choice), more than tenant {tenant}'s tokens_per_minute ({tpm}); "
                        "lower max_tokens or n",
                        400,
                        "request_too_large",
                    )
                used = sum(n for _, n in window)
                if used + tokens > tpm:
                    raise Refused(
                        f"tenant {tenant} used {used} of its {tpm} tokens per minute; this "
                        f"request may use {tokens} more",
                        429,
                        "tokens_limit_exceeded",
                        self._tokens_retry(window, used + tokens - tpm, now),
                    )
                lease.entry = [now, tokens]
                window.append(lease.entry)
            leases.append(lease)
            return lease

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._settle(lease, correct=True)
            if lease.tenant in self._in_flight:
                return
            window = self._window.get(lease.tenant)
            if window is not None:
                now = self.clock()
                while window and window[0][0] <= now - WINDOW_S:
                    window.popleft()
                if not window:
                    del self._window[lease.tenant]

    def _settle(self, lease: Lease, correct: bool) -> None:
        """`lease` leaves the in-flight list; with `correct`, its charge becomes what it
        used (its streams' token counts are final once the request is recorded)."""
        leases = self._in_flight.get(lease.tenant, [])
        if lease in leases:
            leases.remove(lease)
        if correct and lease.entry is not None:
            lease.entry[1] = min(lease.entry[1], lease.used())
        if not leases:
            self._in_flight.pop(lease.tenant, None)

    def _concurrency_retry(self, leases: list[Lease]) -> int:
        now = time.monotonic()  # the streams' clock
        ends = [lease.seconds_left(now) for lease in leases]
        known = [e for e in ends if e is not None]
        if not known:
            return max(1, self.fallback_retry_s)
        return max(1, math.ceil(min(known)))

    @staticmethod
    def _tokens_retry(window: deque[list], excess: int, now: float) -> int:
        """Seconds until the oldest charges that leave the window add up to `excess`."""
        freed = 0
        for at, tokens in window:
            freed += tokens
            if freed >= excess:
                return max(1, math.ceil(at + WINDOW_S - now))
        return math.ceil(WINDOW_S)  # not reached: `excess` <= the window's sum
