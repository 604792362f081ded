"""The tiered adapter registry: adapters on disk -> a CPU-memory LRU -> the engine's slots, and
merged virtual adapters beside the CPU tier: one residency policy for all of them."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from lorafleet.adapters import DEFAULT_MAX_RANK, Adapter, read_adapter
from lorafleet.adapters.format import CONFIG_NAME
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapter_store import (
    MB,
    CpuCache,
    Failures,
    Stamp,
    adapters_root,
    cache_budget,
    check_name,
    check_servable,
    meta_reference,
    name_problem,
    resolve_inside,
    stamp,
    to_slot_format,
)
from lorafleet.serve.backend import ServingBackend
from lorafleet.serve.entries import EntryKind, EntryStatus, EntryTable, children, holds_adapters
from lorafleet.serve.hub_source import HubAdapters
from lorafleet.serve.merged import (
    MergedTier,
    MergeFn,
    MergeRecipe,
    build_merged,
    is_virtual,
    virtual_name,
)
from lorafleet.serve.residency import pick_victim, users
from lorafleet.serve.tier_stats import COUNTERS, LoadTimes, tier_rates

log = logging.getLogger(__name__)


class AdapterRegistry:
    """Adapters by name, in three tiers, served through a `ServingBackend` (an `Engine`), as
    the one `AdapterSource` it has.

    - disk: each sub-directory of `adapters_dir` holding an adapter_config.json (named by the
      directory), plus those added with `add(name, path)`. Every other entry of the directory
      is checked on its own by the first of `kinds` (EntryKind: a MoLE, a calibration, a LoC
      model; `add_kind` adds one later) that claims it, or else recorded as a stray: at the
      first scan, at each `rescan` and `refresh(name)` when its files changed. One that fails
      is logged once and recorded unavailable with a one-line reason (`entry`,
      `unavailable`): its requests get that reason, the other entries serve. With
      `scan=False` the first scan waits for a `rescan()` call (after `add_kind`s);
    - CPU memory: read and validated adapters, least recently used out past `cpu_cache_bytes`
      bytes of tensors (e.g. "2GB"; or `cpu_cache_mb`), never one a running request uses
      (dropping one there never touches the slots);
    - resident: the engine's slots. A full engine frees the least recently used slot whose
      adapter no running request pins (nor a waiting one queued before the request asking),
      or else the request waits and the next `prepare` tries again.
    - merged: with a `merge` function (lorafleet.compose.merge_adapters), ties / dare merges
      of these adapters, built once per recipe by `merged_adapter` and kept as virtual
      adapters (`merged:...`, never listed) in the slots' format, least recently used out
      past `merge_cache_mb` MB, never one a request needs. They go in and out of the slots
      by the same least-recently-used choice as the others.
    - hub (`hub_adapters`): a name `org/name[@revision]` not found on disk is fetched from the
      Hugging Face hub on its first request (serve/hub_source.HubAdapters, its own thread),
      then read and validated as any adapter on disk.

    `prepare(name)` only looks things up and returns: reading, validating (`check_adapter`
    against `reference_model`, by default the base built on the meta device; the fingerprint;
    `max_rank`; the slots' own checks) and moving to the slots' device run on `loader_threads`
    background threads, one load per name at a time, at most `prefetch` loaded or loading and
    not yet in a slot (the rest are asked again, in queue order, at the next steps), so the
    other rows keep decoding while adapters load. The copy into a slot needs the engine's
    lock, as any step does: the loader takes it if free, else the next `prepare` (called by the
    engine's step while a request waits) does it. A bad adapter gives a one-line reason, kept
    for `failure_ttl_s` or until its files change, so only its requests fail and a burst of
    them reads its files once. Thread-safe: lock order is always engine, then registry;
    `add`, `state`, `stats` and `names` take the registry's lock alone (a server calls them
    on its event loop, which must not wait for a step).
    The registry attaches itself to the engine as its adapter source (refused when another
    is attached) and detaches on `close()`."""

    def __init__(
        self,
        engine: ServingBackend,
        adapters_dir: str | Path | None = None,
        *,
        cpu_cache_mb: float = 512,
        cpu_cache_bytes: int | str | None = None,
        max_rank: int | None = None,
        base_fingerprint: str | None = None,
        reference_model=None,
        loader_threads: int = 1,
        prefetch: int | None = None,
        force: bool = False,
        failure_ttl_s: float = 10.0,
        merge: MergeFn | None = None,
        merge_cache_mb: float = 256.0,
        hub_adapters: bool = False,
        kinds: Sequence[EntryKind] = (),
        scan: bool = True,
    ):
        budget = cache_budget(cpu_cache_mb, cpu_cache_bytes)
        for what, value in (("loader_threads", loader_threads), ("prefetch", prefetch or 1)):
            if not isinstance(value, int) or value < 1:
                raise LorafleetError(f"{what} must be an integer >= 1, got {value!r}")
        if not isinstance(merge_cache_mb, (int, float)) or not merge_cache_mb >= 0:
            raise LorafleetError(f"merge_cache_mb must be a number >= 0, got {merge_cache_mb!r}")
        has_slots = engine.slot_format() is not None
        self.engine = engine
        self.adapters_dir = adapters_root(adapters_dir)
        # By default the slots' own rank limit: anything above it could never be served.
        self.max_rank = max_rank or (engine.max_rank if has_slots else DEFAULT_MAX_RANK)
        self.base_fingerprint = base_fingerprint or engine.base_fingerprint
        self.force = force
        self.reference = reference_model
        if reference_model is None and has_slots:
            try:
                self.reference = meta_reference(engine.model_config)
            except Exception as exc:  # an exotic model: the slots' checks still apply
                log.warning("no reference model to validate adapters against: %s", exc)
        # Steps hold the engine's lock; so does every slot change made here.
        self._engine_lock = engine.exclusive()  # re-entrant; also tried without blocking
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(loader_threads, thread_name_prefix="lorafleet-load")
        self._closed = False
        self._paths: dict[str, Path] = {}
        self._hidden: set[str] = set()  # removed names that directory discovery must skip
        self._gens: dict[str, int] = {}  # bumped by add/remove: an older load is then void
        self._jobs: dict[str, Future] = {}
        self._staged: dict[str, Adapter] = {}  # validated, on the slots' device, awaiting a slot
        self._failures = Failures(failure_ttl_s)
        self._running: set[str] = set()  # adapters the running batch used at the last look
        self._cpu = CpuCache(budget, pinned=self._pinned)
        self._merge = merge
        self.merged = MergedTier(int(merge_cache_mb * MB), pinned=self._needed)
        self._merging: dict[str, Future] = {}  # recipes being merged, by virtual name
        # With the hub on, names `org/name[@rev]` are fetched on first use (serve/hub_source.py).
        self.hub = HubAdapters(self.adapters_dir) if hub_adapters else None
        self.prefetch = prefetch or max(2 * loader_threads, engine.max_slots)
        self._recency: dict[str, int] = {}
        self._clock = itertools.count(1)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.load_times = LoadTimes()  # disk -> CPU -> slots' format, per cold load
        self.entries = EntryTable(self.adapters_dir, self._pool_stamp)
        self.entries.kinds.extend(kinds)
        self._scanned = False
        if scan:
            self.rescan()
        engine.attach_adapter_source(self)

    # -- the engine's hook ------------------------------------------------------------------

    def prepare(self, name: str) -> str | None:
        """None when `name` is resident, loading or waiting for a free slot (its requests
        wait); else a one-line reason it cannot be served (its requests fail). Quick: any
        disk read happens on a loader thread. Call it per request to prefetch and count hits."""
        try:
            with self._engine_lock, self._lock:
                return self._prepare(name)
        except Exception as exc:  # the engine's step must never die of a registry bug
            log.exception("prepare(%r) failed", name)
            text = str(exc) if isinstance(exc, LorafleetError) else f"{type(exc).__name__}: {exc}"
            return " ".join(f"adapter {name!r} cannot be served: {text}".split())

    def _prepare(self, name: str) -> str | None:
        self._note_in_use()
        if self.engine.adapter_ready(name):  # also one loaded outside the registry
            self.counters["hits"] += 1
            self._touch(name)
            return None
        if is_virtual(name):
            if name not in self.merged:
                return "the merged adapter left the cache before its request ran; send it again"
            return self._install(name)
        hub = self.hub is not None and self.hub.claims(name)
        problem = None if hub else name_problem(name)
        if problem:
            return problem
        if self._closed:
            return "the adapter registry is closed"
        if self.engine.slot_format() is None:
            return "this engine has no adapter slots (max_slots=0 or closed)"
        problem = self.entries.problem(name)
        if problem:
            return problem
        path = self._path_of(name)
        if path is None and hub:
            path, reason = self.hub.poll(name)  # never blocks: fetched on the hub's thread
            if path is None:
                return reason  # None while it is fetched: its requests wait
            self._paths[name] = path
        if path is None:
            return f"unknown adapter {name!r}"
        reason = self._failures.get(name, stamp(path)) if name in self._failures else None
        if reason or name in self._jobs:
            return reason
        if name in self._staged:
            return self._install(name)
        entry = self._cpu.get(name)
        if entry is not None and entry.stamp != stamp(path):
            self._cpu.pop(name)  # rewritten on disk since it was read: read it again
            entry = None
        if entry is None:
            if len(self._jobs) + len(self._staged) >= self.prefetch:
                return None  # enough loads ahead of it: asked again at the next step
            self.counters["misses"] += 1
            self._submit(name, path, None)
            return None
        staged = to_slot_format(entry.adapter, self.engine.slot_format(), copy=False)
        if staged is None and len(self._jobs) + len(self._staged) >= self.prefetch:
            return None
        self.counters["cpu_hits"] += 1
        if staged is None:  # another device or dtype: the copy there runs on a loader thread
            self._submit(name, path, entry.adapter)
            return None
        self._staged[name] = staged
        return self._install(name)

    # -- disk tier ----------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> None:
        """Register an adapter directory under `name`; with an adapters_dir set, the path
        (relative to it, or absolute) must stay inside it; with the hub on, a hub id may name
        its snapshot in the hub cache (serve/hub_source.add_hub_adapter)."""
        hub = self.hub is not None and self.hub.claims(name)
        if not hub:
            check_name(name)
        resolved = resolve_inside(path, None if hub else self.adapters_dir)
        with self._lock:  # registry tables only: no need to wait for a step
            current = self._path_of(name)
            if current is not None and current.resolve() != resolved:
                raise LorafleetError(f"adapter {name} is already registered; remove it first")
            if current is None:
                self._paths[name] = resolved
                self._hidden.discard(name)
                self._gens[name] = self._gens.get(name, 0) + 1

    def remove(self, name: str) -> None:
        """Forget `name` in every tier (its slot too); refused while a request uses it."""
        check_name(name)
        with self._engine_lock, self._lock:
            if self._path_of(name) is None:
                raise LorafleetError(f"unknown adapter {name!r}")
            count = users(self.engine, name)
            if count:
                raise LorafleetError(
                    f"adapter {name} is in use by {count} request(s) and cannot be removed now"
                )
            if self.engine.adapter_ready(name):
                self.engine.unload_adapter(name)
            for table in (self._paths, self._staged, self._recency, self._jobs):
                table.pop(name, None)
            self._cpu.pop(name)
            self._failures.pop(name)
            self._gens[name] = self._gens.get(name, 0) + 1
            self._hidden.add(name)

    def rescan(self, blocking: bool = True) -> None:
        """Check the adapters directory's entries again: pick up adapters that appeared,
        re-check every other entry whose files (or the adapters it read) changed, forget
        vanished ones. Checks run on the caller's thread, one scan at a time (not `blocking`:
        return at once while another runs)."""
        if self.adapters_dir is None:
            return
        with self.entries.scanning(blocking) as mine:
            if not mine:
                return
            try:
                found = list(children(self.adapters_dir))
            except OSError as exc:
                log.warning("cannot list %s: %s", self.adapters_dir, exc)
                return
            for child in found:
                self._scan_one(child)
            present = {child.name for child in found}
            for name in self.entries.names():
                if name not in present:
                    self.entries.forget(name)
            self._scanned = True

    def refresh(self, name: str) -> None:
        """Re-check the directory entry `name` now if its files changed (a request is about
        to use it): a new or non-plain entry only (plain adapters are checked as they load);
        a no-op while a scan runs."""
        if self.adapters_dir is None or name_problem(name) is not None:
            return
        with self._lock:
            plain = name in self._paths and self.entries.get(name) is None
        if plain:
            return
        child = self.adapters_dir / name
        with self.entries.scanning(blocking=False) as mine:
            if not mine:
                return
            if child.exists():
                self._scan_one(child)
            else:
                self.entries.forget(name)

    def add_kind(self, kind: EntryKind) -> None:
        """Check the entries `kind` claims by it from now on (re-checking them now if the
        directory was scanned already)."""
        self.entries.kinds.append(kind)
        if self._scanned:
            self.rescan()

    def _scan_one(self, child: Path) -> None:
        # Inside entries.scanning(): a plain adapter is registered (checked as it loads);
        # anything else is checked by its kind now (or recorded as a stray).
        name = child.name
        kind = self.entries.claimed(child) if child.is_dir() else None
        has_config = child.is_dir() and (child / CONFIG_NAME).is_file()
        if kind is None and has_config and name_problem(name) is None:
            self.entries.forget(name)
            with self._lock:
                self._path_of(name)
            return
        if kind is None and self.hub is not None and holds_adapters(child):
            self.entries.forget(name)  # an org folder: hub ids org/name are served from it
            return
        status = self.entries.check(name, child, kind)
        if status.available and has_config:  # e.g. a calibrated adapter: served as one
            with self._lock:
                self._path_of(name)

    def names(self) -> list[str]:
        """Every adapter that can be asked for: on disk now (and not unavailable), or resident."""
        self.rescan()
        with self._lock:
            known = dict(self._paths)
        ready = self.engine.adapter_ready
        problem = self.entries.problem
        return sorted(
            n
            for n, p in known.items()
            if not problem(n) and ((p / CONFIG_NAME).is_file() or ready(n))
        )

    def entry(self, name: str) -> EntryStatus | None:
        """The last check of the directory entry `name` when it is not a plain adapter (a
        MoLE, a calibrated adapter, a LoC model, a stray), else None."""
        return self.entries.get(name)

    def unavailable(self) -> list[EntryStatus]:
        """The directory entries whose last check failed, by name, each with its reason."""
        return [s for s in self.entries.all() if not s.available]

    def reason(self, name: str) -> str | None:
        """Why `name` cannot be served now: its entry's failed check, or its last failed load
        (kept for failure_ttl_s), else None."""
        problem = self.entries.problem(name)
        if problem:
            return problem
        with self._lock:
            return self._failures.peek(name)

    def adapter_paths(self) -> list[Path]:
        """Every adapter directory in view, once each: the adapters directory's sub-directories
        holding an adapter_config.json and those added (where a MoLE's experts are found)."""
        found: dict[Path, Path] = {}
        if self.adapters_dir is not None:
            try:
                for child in children(self.adapters_dir):
                    if (child / CONFIG_NAME).is_file():
                        found.setdefault(child.resolve(), child)
            except OSError:
                pass
        with self._lock:
            added = list(self._paths.values())
        for path in added:
            found.setdefault(path.resolve(), path)
        return list(found.values())

    def _pool_stamp(self) -> tuple:
        return tuple(sorted((str(p), stamp(p)) for p in self.adapter_paths()))

    def path_of(self, name: str) -> Path | None:
        """The directory adapter `name` is read from, or None when it is not known here."""
        with self._lock:
            return self._path_of(name)

    def _path_of(self, name: str) -> Path | None:
        path = self._paths.get(name)
        if path is None and self.adapters_dir is not None and name not in self._hidden:
            candidate = self.adapters_dir / name
            if (
                name_problem(name) is None
                and (candidate / CONFIG_NAME).is_file()
                and self._discoverable(name, candidate)
            ):
                self._paths[name] = path = candidate
        return path

    def _discoverable(self, name: str, candidate: Path) -> bool:
        # An adapter directory another kind claims (a calibrated adapter) is served once its
        # check passed; a plain one at once (it is checked as it loads).
        status = self.entries.get(name)
        if status is not None:
            return status.available
        return self.entries.claimed(candidate) is None

    # -- loading (loader threads) --------------------------------------------------------------

    def _submit(self, name: str, path: Path, source: Adapter | None) -> None:
        # The stamp is taken before reading: files rewritten during the read count as changed.
        args = (name, path, self._gens.get(name, 0), stamp(path), source)
        self._jobs[name] = self._pool.submit(self._load, *args)

    def _load(self, name: str, path: Path, gen: int, st: Stamp, source: Adapter | None) -> None:
        """Read + validate (or take `source` from the CPU tier), then move to the slots' device."""
        adapter = staged = reason = None
        start = time.perf_counter()
        try:
            adapter = source if source is not None else read_adapter(path)
            if source is None:
                self.validate(adapter)
            # The slots' device and dtype now, so the copy into a slot (under the engine's
            # lock) is device to device; the CPU tier keeps the CPU tensors.
            staged = to_slot_format(adapter, self.engine.slot_format())
        except LorafleetError as exc:
            reason = str(exc)
        except Exception as exc:  # a loader bug fails this adapter, not the server
            log.exception("loading adapter %s failed", name)
            reason = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if self._gens.get(name, 0) != gen or name not in self._paths:
                return  # removed or re-added meanwhile: this result is stale
            self._jobs.pop(name, None)
            if reason is not None:
                self._fail(name, st, reason)
                return
            if source is None:
                self.counters["evictions_cpu"] += len(self._cpu.put(name, adapter, st))
                self.load_times.observe(time.perf_counter() - start)
            self._staged[name] = staged
        # Install now if the engine is between steps; else its next prepare() does it.
        if self._engine_lock.acquire(blocking=False):
            try:
                with self._lock:
                    if name in self._staged and not self.engine.adapter_ready(name):
                        self._install(name)
            except Exception:
                log.exception("installing adapter %s failed", name)
            finally:
                self._engine_lock.release()

    def validate(self, adapter: Adapter) -> None:
        """Raise a one-line error unless `adapter` can be served here (what a load checks)."""
        check_servable(
            adapter,
            self.reference,
            self.base_fingerprint,
            self.max_rank,
            self.engine.check_slots,
            force=self.force,
        )

    # -- merged tier --------------------------------------------------------------------------

    @property
    def can_merge(self) -> bool:
        """True when a merge function was given (ties / dare merges can be served)."""
        return self._merge is not None

    def merged_adapter(self, recipe: MergeRecipe) -> str:
        """The virtual adapter's name for `recipe`: merged from its parts' files the first
        time (read, checked, merged, checked again, in the slots' format) and kept in the
        merged tier; concurrent callers of one recipe share that merge. Blocking (call it
        from a worker thread); a one-line LorafleetError when the recipe cannot be merged."""
        if self._merge is None:
            raise LorafleetError("this registry has no merge function (ties / dare merges)")
        paths = [self._known_path(name) for name, _ in recipe.parts]
        name = virtual_name(recipe, [str(stamp(path)) for path in paths])
        with self._lock:
            if self.merged.get(name) is not None:
                return name
            job = self._merging.get(name)
            mine = job is None
            if mine:
                job = self._merging[name] = Future()
        if not mine:
            return job.result()  # raises what the merging caller raised
        try:
            adapters = [read_adapter(path) for path in paths]
            for adapter in adapters:
                self.validate(adapter)
            merged = build_merged(self._merge, adapters, recipe, self.max_rank)
            self.validate(merged)
            staged = to_slot_format(merged, self.engine.slot_format())
            # Eviction may free a slot: no step may run meanwhile (lock order: engine first).
            with self._engine_lock, self._lock:
                for old in self.merged.put(name, staged):
                    self._recency.pop(old, None)
                    if self.engine.adapter_ready(old):
                        self.engine.unload_adapter(old)
            job.set_result(name)
        except BaseException as exc:
            job.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._merging.pop(name, None)
        parts = ", ".join(n for n, _ in recipe.parts)
        log.info("merged %s (%s of %s)", name, recipe.strategy, parts)
        return name

    def _known_path(self, name: str) -> Path:
        path = self.path_of(name)
        if path is None:
            raise LorafleetError(f"unknown adapter {name!r}")
        return path

    # -- resident tier (engine lock and registry lock held) -------------------------------------

    def _install(self, name: str) -> str | None:
        """Copy `name` (staged, or a merged one) into a slot, first freeing the least recently
        used idle one of ours when all are taken; None also when it must wait for one."""
        engine = self.engine
        if len(engine.loaded_adapters()) >= engine.max_slots:
            victim = pick_victim(self.engine, name, self._owns, self._recency)
            if victim is None and not any(self._owns(n) for n in engine.loaded_adapters()):
                return "every adapter slot holds an adapter loaded outside the registry"
            if victim is None:
                return None  # every slot is pinned: wait, and try again on the next prepare
            engine.unload_adapter(victim)
            self.counters["evictions_slot"] += 1
            log.info("adapter %s left its slot for %s", victim, name)
        if is_virtual(name):  # merged and checked already; its recipe names the base's adapters
            engine.load_adapter(name, self.merged.get(name), force=True)
            self._touch(name)
            return None
        adapter = self._staged.pop(name)
        try:
            engine.load_adapter(name, adapter, force=self.force)
        except LorafleetError as exc:
            self._cpu.pop(name)
            return self._fail(name, stamp(self._paths[name]), str(exc))
        self.counters["loads"] += 1
        self._touch(name)
        return None

    def _owns(self, name: str) -> bool:
        return name in self._paths or is_virtual(name)

    def _note_in_use(self) -> None:
        # The running batch is what recency and the CPU tier's pins come from (a waiting
        # request's adapters are protected from slot eviction by pick_victim anyway).
        running = self.engine.running_adapters()
        for name in running:
            self._recency[name] = next(self._clock)
        self._running.clear()
        self._running.update(running)
        if self._cpu.nbytes > self._cpu.capacity:  # over budget while pins were held
            self.counters["evictions_cpu"] += len(self._cpu.shrink())

    def _pinned(self, name: str) -> bool:
        # A loader thread asks without the engine's lock: the last look, and the batch now.
        return name in self._running or self.engine.adapter_in_use(name) > 0

    def _needed(self, name: str) -> bool:
        # The merged tier is changed with the engine's lock held: the exact count.
        return users(self.engine, name) > 0

    def _touch(self, name: str) -> None:
        self._recency[name] = next(self._clock)
        self._cpu.touch(name)

    # -- failures -----------------------------------------------------------------------------

    def _fail(self, name: str, st: Stamp, message: str) -> str:
        if self.adapters_dir is not None:  # paths relative to the adapters dir in messages
            message = message.replace(str(self.adapters_dir) + os.sep, "")
        reason = self._failures.remember(name, f"adapter {name!r} cannot be served: {message}", st)
        self.counters["failures"] += 1
        log.warning("%s", reason)
        return reason

    # -- introspection ------------------------------------------------------------------------

    def state(self, name: str) -> str | None:
        """resident | loading | staged | cpu | failed | disk | hub (a hub id not fetched yet,
        with the hub on) | unavailable (its directory entry failed its check), or None for an
        unknown name."""
        hub = self.hub is not None and self.hub.claims(name)
        if name_problem(name) and not hub:
            return None
        if self.entries.problem(name):
            return "unavailable"
        # The registry lock alone: a server asks this per request on its event loop, which
        # must never wait for a step (the engine's slot table is read without its lock).
        with self._lock:
            if self.engine.adapter_ready(name):
                return "resident"
            if self._path_of(name) is None:
                return "hub" if hub else None
            for state, table in (
                ("loading", self._jobs),
                ("staged", self._staged),
                ("cpu", self._cpu),
                ("failed", self._failures),
            ):
                if name in table:
                    return state
            return "disk"

    def stats(self) -> dict:
        """Counters (hits: resident when asked; cpu_hits / misses: put in a slot from CPU
        memory / from disk; loads, evictions_cpu, evictions_slot, failures), gauges
        (resident, cpu_bytes, cpu_budget_bytes, cpu_mb, cpu_adapters, loading, staged, known,
        unavailable: directory entries whose check failed),
        per-tier hit rates, and cold-load p50/p99 seconds, for metrics."""
        with self._lock:  # not the engine's: metrics never wait for a step
            return {
                **self.counters,
                **tier_rates(self.counters),
                "resident": len(self.engine.loaded_adapters()),
                "cpu_bytes": self._cpu.nbytes,
                "cpu_budget_bytes": self._cpu.capacity,
                "cpu_mb": self._cpu.nbytes / MB,
                "cpu_adapters": len(self._cpu),
                "loading": len(self._jobs),
                "staged": len(self._staged),
                "known": len(self._paths),
                "unavailable": len(self.unavailable()),
                "cold_loads": self.load_times.count,
                "cold_load_p50_s": self.load_times.quantile(0.5),
                "cold_load_p99_s": self.load_times.quantile(0.99),
            }

    def cpu_adapters(self) -> list[str]:
        """Names in the CPU tier, least recently used first."""
        with self._lock:
            return list(self._cpu.entries)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the loads in flight now; False if some are still running after `timeout`."""
        with self._lock:
            jobs = list(self._jobs.values())
        return not wait_futures(jobs, timeout=timeout).not_done

    def close(self) -> None:
        """Detach from the engine (its resident adapters stay) and stop the loader threads
        (loads in flight finish; queued ones are dropped)."""
        with self._lock:
            self._closed = True
        if self.hub is not None:
            self.hub.close()
        self.engine.detach_adapter_source(self)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> AdapterRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
