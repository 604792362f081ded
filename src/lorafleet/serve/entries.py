"""The entries of an adapters directory that are not plain adapters (a MoLE, a calibrated
adapter, a LoRA of Change model, a stray folder or file): each checked on its own, at start and
when its files change, and recorded available or unavailable with a one-line reason, so that
no entry stops the server."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lorafleet.adapters.format import CONFIG_NAME
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapter_store import Stamp, name_problem, stamp

log = logging.getLogger(__name__)
MAX_FILES = 256  # files an entry's stamp looks at (a MoLE bundle: config, gates, its experts)
MAX_DEPTH = 3


class EntryKind(Protocol):
    """One kind of entry (a MoLE, a calibration, ...), injected by what serves it; a kind is
    asked in the order it was added, and the first that `claims` a directory checks it."""

    kind: str  # its short name in listings and metrics: "mole", "calibrated", "change"
    label: str  # how messages name one: "MoLE", "calibrated adapter", "LoC model"
    usage: str  # what a text request naming a good one is told ("" when it serves text)
    pool: bool  # True when its check reads other adapters (any change there re-checks it)

    def claims(self, path: Path) -> bool:
        """True when `path` is an entry of this kind (cheap: marker files only)."""
        ...

    def check(self, name: str, path: Path) -> Sequence[Path]:
        """Check the entry and make it servable under `name` (replacing an earlier version);
        a one-line LorafleetError when it cannot be. Returns the directories outside `path`
        it read (a MoLE's experts): their change re-checks it."""
        ...

    def drop(self, name: str) -> None:
        """Stop serving `name` (it failed a check, vanished or became another kind)."""
        ...


@dataclass(frozen=True)
class EntryStatus:
    """What the last check of one entry found; `reason` None means available."""

    name: str
    kind: str
    reason: str | None
    usage: str = ""
    seen: tuple = ()  # what the check depended on: (own files, others' stamps)

    @property
    def available(self) -> bool:
        return self.reason is None


def tree_stamp(path: Path) -> tuple:
    """(relative path, mtime_ns, size) of the files under `path` (MAX_DEPTH levels, the first
    MAX_FILES in sorted order); a file is itself: changes when any of them is rewritten."""
    out = []
    try:
        st = path.stat()
    except OSError:
        return (None,)
    if not path.is_dir():
        return ((".", st.st_mtime_ns, st.st_size),)
    for dirpath, dirnames, filenames in os.walk(path):
        depth = len(Path(dirpath).relative_to(path).parts)
        dirnames[:] = sorted(dirnames) if depth < MAX_DEPTH else []
        for name in sorted(filenames):
            file = Path(dirpath) / name
            try:
                fs = file.stat()
            except OSError:
                continue
            out.append((str(file.relative_to(path)), fs.st_mtime_ns, fs.st_size))
            if len(out) >= MAX_FILES:
                return tuple(out)
    return tuple(out)


def stray_reason(path: Path) -> str:
    """Why a child of the adapters directory that no kind claims is not an adapter."""
    if not path.is_dir():
        return "a file, not an adapter directory"
    return f"not an adapter directory (no {CONFIG_NAME})"


class EntryTable:
    """The checked entries of one adapters directory, by name. `check(name, path)` (re)checks
    one entry when its files (or what it depended on) changed since its last check, logging a
    change of status once; `forget` drops vanished ones. Checks run one at a time, inside
    `scanning()`, outside any lock the event loop waits on; reading statuses never waits.
    `pool_stamp()` (the registry's) stamps every adapter a `pool` kind may have read."""

    def __init__(self, root: Path | None, pool_stamp: Callable[[], Stamp]):
        self.root = root
        self.kinds: list[EntryKind] = []
        self.pool_stamp = pool_stamp
        self._scan = threading.Lock()
        self._pool: Stamp | None = None  # pool_stamp() once per scan
        self._status: dict[str, EntryStatus] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def scanning(self, blocking: bool = True) -> Iterator[bool]:
        """Hold the scan lock (yields False, holding nothing, when not `blocking` and another
        scan runs): `check` and `forget` are called inside it."""
        if not self._scan.acquire(blocking=blocking):
            yield False
            return
        self._pool = None
        try:
            yield True
        finally:
            self._pool = None
            self._scan.release()

    def _pool_now(self) -> Stamp:
        if self._pool is None:
            self._pool = self.pool_stamp()
        return self._pool

    # -- reading (never waits for a check) ------------------------------------------------------

    def get(self, name: str) -> EntryStatus | None:
        with self._lock:
            return self._status.get(name)

    def problem(self, name: str) -> str | None:
        status = self.get(name)
        return status.reason if status is not None else None

    def all(self) -> list[EntryStatus]:
        with self._lock:
            return sorted(self._status.values(), key=lambda s: s.name)

    def claimed(self, path: Path) -> EntryKind | None:
        """The first kind that claims `path` (a kind that fails to answer claims nothing)."""
        for kind in list(self.kinds):
            try:
                if kind.claims(path):
                    return kind
            except Exception:  # a claims() bug must not stop a scan
                log.exception("%s.claims(%s) failed", type(kind).__name__, path)
        return None

    # -- checking (inside scanning()) ----------------------------------------------------

    def check(self, name: str, path: Path, kind: EntryKind | None) -> EntryStatus:
        """Check `path` as `kind` (None: a stray entry) unless nothing it depends on changed."""
        own = tree_stamp(path)
        previous = self.get(name)
        label = kind.kind if kind is not None else "unknown"
        if previous is not None and previous.kind == label and self._unchanged(previous, own):
            return previous
        deps: Sequence[Path] = ()
        problem = name_problem(name)
        if problem is None and kind is None:
            problem = stray_reason(path)
        elif problem is None:
            try:
                deps = tuple(kind.check(name, path))
            except LorafleetError as exc:
                problem = str(exc)
            except Exception as exc:  # a check's bug fails this entry, not the server
                log.exception("checking %s failed", path)
                problem = f"{type(exc).__name__}: {exc}"
        if problem is not None and kind is not None:
            self._drop(kind, name)
        if previous is not None and previous.kind != label:
            self._drop(self._kind_named(previous.kind), name)
        status = self._status_of(name, kind, problem, own, deps)
        with self._lock:
            self._status[name] = status
        self._log(previous, status)
        return status

    def forget(self, name: str) -> None:
        """`name` vanished or became a plain adapter: stop serving it as an entry."""
        with self._lock:
            previous = self._status.pop(name, None)
        if previous is not None:
            self._drop(self._kind_named(previous.kind), name)
            if previous.reason is not None:
                log.info("%s is no longer unavailable: gone, or now a plain adapter", name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._status)

    def _status_of(self, name, kind, problem, own, deps) -> EntryStatus:
        label = kind.label if kind is not None else "entry"
        reason = None
        if problem is not None:
            if self.root is not None:  # paths relative to the adapters dir in messages
                problem = problem.replace(str(self.root) + os.sep, "")
            reason = " ".join(f"{label} {name!r} is unavailable: {problem}".split())
        # A failed check of a pool kind may be fixed by any adapter appearing or changing.
        others = (
            self._pool_now() if (problem is not None and kind is not None and kind.pool) else ()
        )
        seen = (own, tuple(deps), tuple(stamp(d) for d in deps), others)
        return EntryStatus(
            name=name,
            kind=kind.kind if kind is not None else "unknown",
            reason=reason,
            usage=kind.usage if kind is not None else "",
            seen=seen,
        )

    def _unchanged(self, previous: EntryStatus, own: tuple) -> bool:
        old_own, deps, dep_stamps, others = previous.seen
        if old_own != own or tuple(stamp(d) for d in deps) != dep_stamps:
            return False
        return not others or others == self._pool_now()

    def _kind_named(self, kind: str) -> EntryKind | None:
        return next((k for k in self.kinds if k.kind == kind), None)

    @staticmethod
    def _drop(kind: EntryKind | None, name: str) -> None:
        if kind is None:
            return
        try:
            kind.drop(name)
        except Exception:
            log.exception("%s.drop(%s) failed", type(kind).__name__, name)

    @staticmethod
    def _log(previous: EntryStatus | None, status: EntryStatus) -> None:
        before = (previous.kind, previous.reason) if previous is not None else None
        if before == (status.kind, status.reason):
            return
        if status.reason is not None:
            log.warning("%s", status.reason)
        elif previous is not None and previous.reason is not None:
            log.info("%s %r is available again", status.kind, status.name)


def holds_adapters(path: Path) -> bool:
    """True when some sub-directory of `path` is an adapter directory (an `org/` folder of
    hub ids `org/name`)."""
    try:
        return any((p / CONFIG_NAME).is_file() for p in path.iterdir() if p.is_dir())
    except OSError:
        return False


def children(root: Path) -> Iterable[Path]:
    """The entries of an adapters directory: every child but hidden ones (uploads in progress
    write to .upload-* temp dirs, editors leave dotfiles)."""
    return (p for p in sorted(root.iterdir()) if not p.name.startswith("."))
