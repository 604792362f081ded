"""The engine's door for other threads: requests and cancels that never wait for a step."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from lorafleet.serve.sequence import Sequence

Item = tuple[str, "Sequence | int"]  # ("add", Sequence) or ("cancel", request_id)


class Intake:
    """Requests and cancels from any thread, applied in arrival order by `apply(kind, item)`.

    `offer` applies them at once when `lock` is free (no step is running), else leaves them
    for the next step, which calls `drain` first (with the lock held), so a request that
    arrives during a forward joins the next batch. deque appends and pops are atomic, so an
    asyncio event loop may call `offer` and never waits for a forward pass. `after` runs
    (lock held) once something was applied outside a step, e.g. to refresh a stats snapshot."""

    def __init__(
        self,
        lock: threading.RLock,
        apply: Callable[[str, Sequence | int], None],
        after: Callable[[], None],
    ):
        self._lock, self._apply, self._after = lock, apply, after
        self._items: deque[Item] = deque()

    def offer(self, kind: str, item: Sequence | int) -> None:
        self._items.append((kind, item))
        if self._lock.acquire(blocking=False):
            try:
                self.drain()
                self._after()
            finally:
                self._lock.release()

    def drain(self) -> None:
        """Apply everything queued, oldest first (the caller holds the lock)."""
        while self._items:
            self._apply(*self._items.popleft())

    def pending_adds(self) -> int:
        """Requests queued and not yet applied (they count as waiting)."""
        return sum(1 for kind, _ in list(self._items) if kind == "add")

    def holds_add(self, request_id: int) -> bool:
        return any(
            kind == "add" and item.request_id == request_id for kind, item in list(self._items)
        )

    def __bool__(self) -> bool:
        return bool(self._items)
