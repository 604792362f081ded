"""A daemon thread that steps an engine while it has work (what `Engine.start` runs)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class StepThread:
    """Calls `step()` on a daemon thread while `has_work()`; sleeps on an event otherwise.

    `wake()` (after a request is added) ends the idle wait at once; `running()` is the number
    of running requests, read before and after a step: a step that ran none only waited for
    an adapter being loaded, so the thread pauses briefly instead of spinning. `threads` sets
    torch's intra-op threads of this thread alone (the forward passes'). A failing step is
    logged and counted (`failed_steps`): the engine fails batches itself, this is the last
    resort that keeps serving."""

    def __init__(
        self,
        step: Callable[[], object],
        has_work: Callable[[], bool],
        running: Callable[[], int],
        threads: int | None = None,
    ):
        self.step, self.has_work, self.running, self.threads = step, has_work, running, threads
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorafleet-engine", daemon=True)
        self.failed_steps = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while not self._stopping.is_set():
            if not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                ran = self.running()
                self.step()
                if not ran and not self.running():
                    time.sleep(0.002)  # only waiting for an adapter being loaded
            except Exception:
                self.failed_steps += 1
                log.exception("engine step failed")
                time.sleep(0.05)

    def stop(self, grace_s: float, cancel_all: Callable[[], object]) -> None:
        """Keep stepping while there is work, for up to `grace_s` seconds; then `cancel_all()`
        and end the thread."""
        deadline = time.monotonic() + max(0.0, grace_s)
        while self.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        cancel_all()
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
