"""Which resident adapter leaves its slot, and who needs an adapter: the registry's one policy."""

from __future__ import annotations

from collections.abc import Callable

from lorafleet.serve.backend import ServingBackend


def users(backend: ServingBackend, name: str) -> int:
    """Running and waiting requests that need `name`, alone or in a mixture: the one in-use
    count (an adapter with users is neither removed nor dropped from a tier). Call with
    `backend.exclusive()` held."""
    waiting = sum(1 for names in backend.waiting_adapters() if name in names)
    return backend.adapter_in_use(name) + waiting


def pick_victim(
    backend: ServingBackend, name: str, owned: Callable[[str], bool], recency: dict[str, int]
) -> str | None:
    """The least recently used resident adapter that `owned` accepts (the registry's, merged
    ones included), that no running request pins and that no request queued up to `name`'s
    first one waits for (later ones may wait again: FIFO, so a busy adapter cannot keep
    `name` out forever). None when every candidate is needed. Call with
    `backend.exclusive()` held."""
    waiting = backend.waiting_adapters()
    first = next((i for i, names in enumerate(waiting) if name in names), len(waiting))
    # A mixture's other adapters count as wanted by it too (up to and including `first`), so
    # loading one part never evicts another part of the same request.
    wanted = {n for names in waiting[: first + 1] for n in names}
    candidates = [
        n
        for n in backend.loaded_adapters()
        if n != name and owned(n) and n not in wanted and not backend.adapter_in_use(n)
    ]
    return min(candidates, key=lambda n: recency.get(n, 0), default=None)
