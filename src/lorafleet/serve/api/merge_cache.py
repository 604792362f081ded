"""Non-linear merges (ties, dare_*) as virtual adapters: merged once, kept in an LRU by bytes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.adapters import Adapter, lora_pairs, read_adapter
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapter_store import MB, slot_format, stamp, tensor_bytes, to_slot_format
from lorafleet.serve.api.errors import APIError

log = logging.getLogger(__name__)

# ':' is not allowed in adapter names, so a virtual name never collides with a real adapter
# and no client can ask for one by name.
VIRTUAL_PREFIX = "merged:"
DARE_SEED = 0  # DARE drops at random: a fixed seed makes one recipe one adapter (cacheable)

# merge(adapters, weights, method, *, density, majority_sign, seed, rank, names) -> Adapter
# (lorafleet.compose.merge_adapters; injected by the CLI, serve sits below compose).
MergeFn = Callable[..., Adapter]


@dataclass
class _Entry:
    adapter: Adapter
    nbytes: int


class MergeCache:
    """Merged adapters by recipe, least recently used out past `max_mb` MB of tensors; also the
    engine's adapter source, in front of the registry: a virtual name is copied into a slot
    from here (freeing an idle slot if all are taken), any other name goes to the registry
    (after freeing an idle virtual slot when the slots are full, so merges never starve it)."""

    def __init__(self, engine, registry, merge: MergeFn, max_mb: float = 256.0):
        self.engine, self.registry, self.merge = engine, registry, merge
        self.capacity = int(max_mb * MB)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, asyncio.Future] = {}
        self.nbytes = 0
        self.merges = 0
        self.evictions = 0
        engine.adapter_source = self

    # -- the route's side -------------------------------------------------------------------

    def name_of(self, mix) -> str:
        """The virtual adapter's name: a hash of the recipe and of the parts' file versions."""
        parts = [(n, w, str(stamp(self._path(n)))) for n, w in mix.parts]
        recipe = [mix.strategy, mix.density, mix.sign_method, DARE_SEED, parts]
        digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
        return f"{VIRTUAL_PREFIX}{mix.strategy}:{digest}"

    async def adapter_for(self, mix) -> str:
        """The name of `mix` merged (merging it on a worker thread the first time; concurrent
        requests for one recipe share that merge). A recipe that cannot merge is a 400."""
        name = self.name_of(mix)
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return name
        pending = self._building.get(name)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._build, name, mix))
            self._building[name] = pending
            pending.add_done_callback(lambda _f: self._building.pop(name, None))
        try:
            await asyncio.shield(pending)
        except LorafleetError as exc:
            raise APIError(
                400, f"{mix.param}: {exc}", code="merge_failed", param=mix.param
            ) from None
        return name

    def _path(self, name: str):
        path = self.registry.path_of(name)
        if path is None:
            raise LorafleetError(f"unknown adapter {name!r}")
        return path

    def _build(self, name: str, mix) -> None:
        names = [n for n, _ in mix.parts]
        parts = []
        for n in names:
            adapter = read_adapter(self._path(n))
            self.registry.validate(adapter)
            parts.append(adapter)
        kw = {
            "density": mix.density,
            "majority_sign": mix.sign_method,
            "seed": DARE_SEED,
            "names": names,
        }
        merged = self.merge(parts, [w for _, w in mix.parts], mix.strategy, **kw)
        if _max_rank(merged) > self.registry.max_rank:  # the slots' limit: truncate (SVD) to it
            merged = self.merge(
                parts, [w for _, w in mix.parts], mix.strategy, rank=self.registry.max_rank, **kw
            )
        self.registry.validate(merged)
        staged = to_slot_format(merged, slot_format(self.engine.handle))
        with self.engine.exclusive():  # eviction may free a slot: no step may run meanwhile
            self._store(name, staged)
        log.info("merged %s (%s of %s)", name, mix.strategy, ", ".join(names))

    def _store(self, name: str, adapter: Adapter) -> None:
        with self._lock:
            entry = _Entry(adapter, tensor_bytes(adapter))
            self._entries[name] = entry
            self.nbytes += entry.nbytes
            self.merges += 1
            for old in list(self._entries):
                if self.nbytes <= self.capacity or old == name:
                    break
                if self._busy(old):
                    continue
                if self.engine.adapter_ready(old):
                    self.engine.unload_adapter(old)
                self.nbytes -= self._entries.pop(old).nbytes
                self.evictions += 1

    def _busy(self, name: str) -> bool:
        waiting = self.engine.scheduler.waiting
        return bool(self.engine.adapter_in_use(name)) or any(name in s.adapters for s in waiting)

    # -- the engine's side (AdapterSource; called with the engine's lock held) ----------------

    def prepare(self, name: str) -> str | None:
        if not name.startswith(VIRTUAL_PREFIX):
            if not self.engine.adapter_ready(name) and self._full():
                self._free_slot(virtual_only=True)
            return self.registry.prepare(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
        if entry is None:
            return "the merged adapter left the cache before its request ran; send it again"
        if self.engine.adapter_ready(name):
            return None
        if self._full() and not self._free_slot(virtual_only=False):
            return None  # every slot is pinned: wait for the next step
        self.engine.load_adapter(name, entry.adapter, force=True)
        return None

    def _full(self) -> bool:
        return len(self.engine.loaded_adapters()) >= self.engine.max_slots

    def _free_slot(self, virtual_only: bool) -> bool:
        """Unload one idle resident adapter (virtual ones first; a registry one reloads from
        its CPU tier when asked again). False when every slot is pinned."""
        resident = list(self.engine.loaded_adapters())
        order = [n for n in resident if n.startswith(VIRTUAL_PREFIX)]
        if not virtual_only:
            order += [n for n in resident if not n.startswith(VIRTUAL_PREFIX)]
        for victim in order:
            if not self._busy(victim):
                self.engine.unload_adapter(victim)
                return True
        return False

    def stats(self) -> dict:
        with self._lock:
            return {
                "mb": self.nbytes / MB,
                "adapters": len(self._entries),
                "merges": self.merges,
                "evictions": self.evictions,
            }


def _max_rank(adapter: Adapter) -> int:
    pairs = lora_pairs(adapter.tensors, strict=False)
    return max((a.shape[0] for a, _ in pairs.values()), default=0)
