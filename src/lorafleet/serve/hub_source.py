"""Hub adapters for the adapter registry: `org/name[@revision]` names fetched on a thread of
their own (never on the engine's step nor the HTTP event loop), once each; and what
`lorafleet serve --adapters VALUE` names (a local directory, or with the hub on, a hub id)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lorafleet.adapters.format import CONFIG_NAME
from lorafleet.adapters.hub import HubRef, fetch_adapter, not_found_hint, parse_hub_ref
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapter_store import Failures


class HubAdapters:
    """Hub ids -> local snapshot directories, for an AdapterRegistry with the hub on.

    `poll(name)` never blocks: (path, None) once fetched, or at once when `local_root/org/name`
    is a local adapter directory (a local directory wins over the hub); (None, None) while the
    fetch runs (the first poll starts it, on this object's one thread); (None, reason) when it
    failed. A failure is kept `failure_ttl_s` seconds, so a burst of requests for a repository
    that is not cached while offline tries once. The registry keeps the path it gets, so each
    name is fetched once per server. `fetch` is fetch_adapter (tests count its calls)."""

    def __init__(
        self,
        local_root: Path | None = None,
        *,
        fetch: Callable[[HubRef], Path] = fetch_adapter,
        failure_ttl_s: float = 10.0,
    ):
        self.local_root = local_root
        self.failure_ttl_s = failure_ttl_s
        self._fetch = fetch
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lorafleet-hub")
        self._jobs: dict[str, Future] = {}
        self._failed = Failures(failure_ttl_s)  # reasons, kept failure_ttl_s seconds

    def claims(self, name) -> bool:
        """True when `name` is a hub id (`org/name[@revision]`)."""
        return parse_hub_ref(name) is not None

    def local(self, name: str) -> Path | None:
        """`local_root/name` when it is an adapter directory inside local_root, else None."""
        if self.local_root is None or not self.claims(name):
            return None
        candidate = self.local_root / name
        inside = candidate.resolve().is_relative_to(self.local_root.resolve())
        return candidate if inside and (candidate / CONFIG_NAME).is_file() else None

    def poll(self, name: str) -> tuple[Path | None, str | None]:
        """(path, None) | (None, None) while fetching | (None, one-line reason); see the class."""
        ref = parse_hub_ref(name)
        if ref is None:
            return None, f"invalid hub adapter id {name!r}: use org/name or org/name@revision"
        local = self.local(name)
        if local is not None:
            return local, None
        with self._lock:
            failed = self._failed.get(name, None)  # None once expired
            if failed is not None:
                return None, failed
            job = self._jobs.get(name)
            if job is None:
                self._jobs[name] = self._pool.submit(self._fetch, ref)
                return None, None
            if not job.done():
                return None, None
            del self._jobs[name]
            try:
                return Path(job.result()), None
            except LorafleetError as exc:
                reason = str(exc)
            except Exception as exc:  # a fetch bug fails this adapter, not the server
                reason = f"hub adapter {ref}: {type(exc).__name__}: {exc}"
            return None, self._failed.remember(name, reason, None)

    def close(self) -> None:
        """Stop the fetch thread; a fetch in flight is not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve_source(value: str | None, hub: bool) -> tuple[Path | None, HubRef | None, Path | None]:
    """What `serve --adapters VALUE` names: (the local adapters directory, None, None) when
    VALUE is a directory (a local directory wins), or with `hub` on, (None, its HubRef, its
    fetched snapshot) for a hub id; a one-line LorafleetError otherwise (a hub id with the
    hub off gets a hint naming the flag)."""
    if value is None:
        return None, None, None
    path = Path(value).expanduser()
    if path.is_dir():
        return path, None, None
    ref = parse_hub_ref(value)
    if ref is None:
        raise LorafleetError(f"--adapters {value}: no such directory")
    if not hub:
        raise LorafleetError(f"--adapters {value}: no such directory ({not_found_hint(value)})")
    return None, ref, fetch_adapter(ref)


def add_hub_adapter(registry, ref: HubRef, path: Path) -> str:
    """Register the fetched hub adapter `ref` (at `path`) in `registry` under its id, after
    reading and validating it as any adapter (one-line error if it cannot be served)."""
    from lorafleet.adapters import read_adapter

    try:
        registry.validate(read_adapter(path))
    except LorafleetError as exc:
        raise LorafleetError(f"hub adapter {ref}: {exc}") from None
    registry.add(str(ref), path)
    return str(ref)


__all__ = ["HubAdapters", "add_hub_adapter", "serve_source"]
