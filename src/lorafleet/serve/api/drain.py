"""Graceful drain (SIGTERM): new requests get 503 with Retry-After, in-flight ones finish up to
the drain timeout, streams still open then end with an SSE error event, and the server stops."""

from __future__ import annotations

import time
from collections.abc import Callable

from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.state import ServerState

# After the cut: how long the cut requests get to send their last events and close.
CUT_FLUSH_S = 5.0
# Never refused nor waited for while draining: what load balancers and monitoring poll.
UNCOUNTED = frozenset({"/health", "/metrics"})


class Drain:
    """One server's drain. `Gate` counts the HTTP requests in flight (`in_flight`); once
    `request()` is called (a SIGTERM), new requests are refused and `tick()`, called on the
    event loop every ~0.1 s, says when the server may stop: when nothing is in flight, or
    `state.config.drain_timeout_s` after the request, the streams still live are cut
    (`RequestStreams.cut_all`) and, CUT_FLUSH_S later at the latest, the server stops.
    `hurry()` (a second SIGTERM) cuts at the next tick instead of at the timeout."""

    def __init__(self, state: ServerState, clock: Callable[[], float] = time.monotonic):
        self.state, self.clock = state, clock
        self.in_flight = 0
        self.requested_at: float | None = None
        self.cut_at: float | None = None
        self.cut = 0  # streams the timeout cut
        self.hurried = False  # cut now, without waiting for the timeout (a second SIGTERM)

    @property
    def active(self) -> bool:
        return self.requested_at is not None

    def request(self) -> None:
        """Start draining (again: a no-op). Safe in a signal handler: it only sets fields."""
        if self.requested_at is None:
            self.requested_at = self.clock()

    def hurry(self) -> None:
        """Cut what is in flight at the next tick, as the timeout would (signal-safe)."""
        self.request()
        self.hurried = True

    def tick(self) -> bool:
        """True once the server may stop (call only while `active`, on the event loop)."""
        if self.in_flight == 0:
            return True
        now = self.clock()
        if self.cut_at is None:
            if not self.hurried and now - self.requested_at < self.state.config.drain_timeout_s:
                return False
            self.cut_at = now
            why = (
                "was stopped by a second shutdown signal"
                if self.hurried
                else f"ran past the drain timeout ({self.state.config.drain_timeout_s:g} s)"
            )
            message = f"the server is shutting down: this request {why}; send it again"
            self.cut = self.state.streams.cut_all(message, self.state.config.retry_after_s)
        return now - self.cut_at >= CUT_FLUSH_S

    def refusal(self) -> APIError:
        """The answer to a request that arrives while draining (the connection is closed
        after it, so a client's next try opens a new one, e.g. to another replica)."""
        headers = {"Retry-After": str(self.state.config.retry_after_s), "Connection": "close"}
        return APIError(
            503, "the server is draining for a restart", code="draining", headers=headers
        )


class Gate:
    """ASGI middleware: counts each HTTP request in flight on `drain` until its response is
    sent (a stream until its last event) and, while the server drains or closes, answers new
    ones with `drain.refusal()`; paths in UNCOUNTED pass through either way."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED:
            await self.app(scope, receive, send)
            return
        if self.drain.active or self.drain.state.closing:
            await self.drain.refusal().response()(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
