"""Which resident adapter leaves its slot: the least recently used one no request needs first."""

from __future__ import annotations

import math


def pick_victim(engine, name: str, ours, recency: dict[str, int]) -> str | None:
    """The least recently used resident adapter in `ours` that no running request pins and no
    request queued before `name`'s first one waits for (later ones may wait again: FIFO, so a
    busy adapter cannot keep `name` out forever). Call with the engine's lock held."""
    waiting = list(engine.scheduler.waiting)
    first = min((s.request_id for s in waiting if name in s.adapters), default=math.inf)
    # A mixture's other adapters count as wanted by it too (<=), so loading one part
    # never evicts another part of the same request.
    wanted = {n for s in waiting if s.request_id <= first for n in s.adapters}
    candidates = [
        n
        for n in engine.loaded_adapters()
        if n != name and n in ours and n not in wanted and not engine.adapter_in_use(n)
    ]
    return min(candidates, key=lambda n: recency.get(n, 0), default=None)


def count_users(engine, name: str) -> int:
    """Running and waiting requests that need `name` (engine lock held)."""
    waiting = engine.scheduler.waiting
    return engine.adapter_in_use(name) + sum(1 for s in waiting if name in s.adapters)


def running_adapters(engine) -> set[str]:
    """Adapters the running batch uses now (engine lock held; the batch is small)."""
    return {name for seq in engine.scheduler.running for name in seq.adapters}
