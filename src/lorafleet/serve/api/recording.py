"""One place per request records its status and metrics: `with record(state, endpoint) as rec`.

A route opens the record first; it names the adapter once the model is resolved (`rec.started`),
answers a client that went away with `rec.client_closed()`, and a streamed body hands the record
to its generator (`rec.defer()`), which calls `rec.finish(status)` when the stream ends. An
APIError leaving the block is recorded with its status, anything else as a 500."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi.responses import JSONResponse

from lorafleet.serve.api.errors import APIError

CLIENT_CLOSED = 499  # nginx's "client closed request": the caller left before the answer


class RequestRecord:
    """One request's endpoint, adapter label, stream and status, recorded exactly once."""

    def __init__(self, metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.label = "-"  # until the model is resolved (unknown names never become labels)
        self.stream = None
        self.status = 200
        self.deferred = False
        self.recorded = False
        self.finishers: list = []  # called once when it is recorded (e.g. a limits lease)

    def started(self, label: str, stream=None) -> None:
        """The request's model is resolved to `label`; `stream` carries its token timings."""
        self.label, self.stream = label, stream

    def client_closed(self) -> JSONResponse:
        """The reply to a client that disconnected before its answer (recorded as 499)."""
        self.status = CLIENT_CLOSED
        return JSONResponse({}, status_code=CLIENT_CLOSED)

    def on_finish(self, callback) -> None:
        """Call `callback()` when the request is recorded (however it ends)."""
        self.finishers.append(callback)

    def defer(self) -> None:
        """A streamed body records the request itself (`finish`) when it ends."""
        self.deferred = True

    def finish(self, status: int | None = None) -> None:
        if self.recorded:
            return
        self.recorded = True
        self.status = self.status if status is None else status
        for callback in self.finishers:
            callback()
        self.metrics.finished(self.endpoint, self.label, self.status, self.stream)


@contextlib.contextmanager
def record(state, endpoint: str) -> Iterator[RequestRecord]:
    """The request's record; its status and metrics are written when the block ends (or, after
    `defer()`, when the streamed body ends)."""
    rec = RequestRecord(state.metrics, endpoint)
    try:
        yield rec
    except APIError as exc:
        rec.finish(exc.status)
        raise
    except Exception:
        rec.finish(500)
        raise
    if not rec.deferred:
        rec.finish()
