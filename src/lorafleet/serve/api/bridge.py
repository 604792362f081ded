"""The engine on its own thread, its per-token events delivered to asyncio streams."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from lorafleet.serve.engine import Engine
from lorafleet.serve.sequence import SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server admits (answered as 429)."""


@dataclass
class Stream:
    """One request's events as an async iterator; timing for metrics (monotonic seconds)."""

    request_id: int
    prompt_tokens: int
    adapter: str | None
    queue: asyncio.Queue
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False

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


class EngineLoop:
    """Steps `engine` on a daemon thread while it has work; `submit` from the event loop.

    The event loop never waits for a forward pass: `submit` and `cancel` go through the
    engine's lock-free request path (a request arriving during a step joins the next one)
    and the queue depth is read from the engine's stats snapshot. Tokens reach each stream
    through `call_soon_threadsafe` as the engine produces them.
    `max_waiting` bounds the queue of admitted-but-not-running requests (QueueFull past it).
    `stop(grace)` lets running requests finish for `grace` seconds, then cancels the rest."""

    def __init__(self, engine: Engine, max_waiting: int = 256, threads: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.threads = threads  # torch's intra-op threads for the forward passes
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams: dict[int, Stream] = {}
        self.failed_steps = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.threads:
            # Set on this thread: it is the one whose forward passes use the thread pool.
            torch.set_num_threads(self.threads)
        while not self._stopping.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                # Read the running set directly: stats() builds a dict under the lock per step.
                ran = bool(self.engine.scheduler.running)
                self.engine.step()
                if not ran and not self.engine.scheduler.running:
                    time.sleep(0.002)  # only waiting for an adapter being loaded
            except Exception:  # the engine fails batches itself; this is a last resort
                self.failed_steps += 1
                log.exception("engine step failed")
                time.sleep(0.05)

    async def submit(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams
    ) -> Stream:
        """Queue a request; its events arrive on the returned stream. Raises QueueFull."""
        if self.engine.stats()["waiting"] >= self.max_waiting:
            raise QueueFull
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(event: TokenEvent) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        request_id = self.engine.add_request(prompt_ids, adapter, params, on_token)
        stream = Stream(request_id, len(prompt_ids), adapter, queue)
        self._wake.set()
        return stream

    def cancel(self, stream: Stream) -> None:
        if not stream.done:
            self.engine.cancel(stream.request_id)

    def stop(self, grace: float = 10.0) -> None:
        """Finish in-flight requests for up to `grace` seconds, cancel the rest, stop."""
        deadline = time.monotonic() + max(0.0, grace)
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.engine.cancel_all()
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
