"""Requests to the serving backend from the event loop, their token events as asyncio streams."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from lorafleet.serve.backend import AdapterSpec, ServingBackend
from lorafleet.serve.sequence import SamplingParams, TokenEvent


class QueueFull(Exception):
    """More requests are waiting than the server admits (answered as 429)."""


@dataclass
class Stream:
    """One request's events as an async iterator; timing for metrics (monotonic seconds)."""

    request_id: int
    prompt_tokens: int
    adapter: AdapterSpec
    queue: asyncio.Queue
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False
    retry_after: int | None = None  # set when a drain cut it (answered 503 + Retry-After)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self.done:
            raise StopAsyncIteration
        event: TokenEvent = await self.queue.get()
        if event.token_id is not None:
            self.completion_tokens += 1
            self.last_token_at = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
        if event.finished:
            self.done, self.finish_reason, self.error = True, event.finish_reason, event.error
        return event


class RequestStreams:
    """Requests to a serving backend from the event loop, each one's events an asyncio stream.

    The event loop never waits for a forward pass: the backend's `add_request` and `cancel`
    never wait for a step, and the queue depth is read from its stats snapshot. Tokens reach
    each stream through `call_soon_threadsafe` as the backend produces them (on its thread).
    `max_waiting` bounds the queue of admitted-but-not-running requests (QueueFull past it).
    `live` holds the streams whose last event has not reached the event loop yet, by request
    id (what a drain cuts)."""

    def __init__(self, backend: ServingBackend, max_waiting: int = 256):
        self.backend = backend
        self.max_waiting = max_waiting
        self.live: dict[int, Stream] = {}

    async def submit(
        self,
        prompt_ids: list[int],
        adapter: AdapterSpec,
        params: SamplingParams,
        tenant: str | None = None,
    ) -> Stream:
        """Queue a request (`tenant`: whose fair share it counts against, None: its
        adapter's); its events arrive on the returned stream. Raises QueueFull."""
        if self.backend.stats()["waiting"] >= self.max_waiting:
            raise QueueFull
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:  # on the event loop
            queue.put_nowait(event)
            if event.finished:
                self.live.pop(event.request_id, None)

        def on_token(event: TokenEvent) -> None:  # runs on the backend's thread
            loop.call_soon_threadsafe(deliver, event)

        request_id = self.backend.add_request(prompt_ids, adapter, params, on_token, tenant=tenant)
        # No await since add_request: its events are delivered after this line.
        stream = self.live[request_id] = Stream(request_id, len(prompt_ids), adapter, queue)
        return stream

    def cancel(self, stream: Stream) -> None:
        if not stream.done:
            self.backend.cancel(stream.request_id)

    def cut_all(self, message: str, retry_after_s: int) -> int:
        """End every live stream now (on the event loop): after the events already queued,
        its reader gets a last event with finish_reason "error" and `message`, and its
        request is cancelled. Returns how many were cut."""
        cut = list(self.live.values())
        self.live.clear()
        for stream in cut:
            stream.retry_after = retry_after_s
            stream.queue.put_nowait(TokenEvent(stream.request_id, None, "", True, "error", message))
            self.backend.cancel(stream.request_id)
        return len(cut)
