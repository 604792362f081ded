"""Merged (ties / dare) virtual adapters: their recipe and name, how one is built, their tier."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.adapters import Adapter, lora_pairs
from lorafleet.serve.adapter_store import MB, CpuCache

# ':' is not allowed in adapter names, so a virtual name never collides with a real adapter
# and no client can ask for one by name.
VIRTUAL_PREFIX = "merged:"
DARE_SEED = 0  # DARE drops at random: a fixed seed makes one recipe one adapter (cacheable)

# merge(adapters, weights, method, *, density, majority_sign, seed, rank, names) -> Adapter
# (lorafleet.compose.merge_adapters; injected by the CLI, serve sits below compose).
MergeFn = Callable[..., Adapter]


@dataclass(frozen=True)
class MergeRecipe:
    """A non-linear merge of registry adapters: (name, weight) parts, the `strategy` (ties,
    dare_linear, dare_ties), TIES/DARE's `density` and TIES's `sign_method`."""

    parts: tuple[tuple[str, float], ...]
    strategy: str
    density: float = 1.0
    sign_method: str = "total"


def is_virtual(name: str) -> bool:
    return name.startswith(VIRTUAL_PREFIX)


def virtual_name(recipe: MergeRecipe, versions: list[str]) -> str:
    """`merged:STRATEGY:HASH`, a hash of the recipe and of its parts' file `versions` (one
    string per part), so a part rewritten on disk makes another adapter."""
    parts = [(n, w, v) for (n, w), v in zip(recipe.parts, versions, strict=True)]
    key = [recipe.strategy, recipe.density, recipe.sign_method, DARE_SEED, parts]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return f"{VIRTUAL_PREFIX}{recipe.strategy}:{digest}"


def build_merged(
    merge: MergeFn, adapters: list[Adapter], recipe: MergeRecipe, max_rank: int
) -> Adapter:
    """`adapters` (the recipe's parts, in order) merged by `recipe`; a result above
    `max_rank` (the slots' limit) is merged again, truncated to it (SVD)."""
    names = [name for name, _ in recipe.parts]
    weights = [weight for _, weight in recipe.parts]
    kw = {
        "density": recipe.density,
        "majority_sign": recipe.sign_method,
        "seed": DARE_SEED,
        "names": names,
    }
    merged = merge(adapters, weights, recipe.strategy, **kw)
    if _max_rank(merged) > max_rank:
        merged = merge(adapters, weights, recipe.strategy, rank=max_rank, **kw)
    return merged


def _max_rank(adapter: Adapter) -> int:
    pairs = lora_pairs(adapter.tensors, strict=False)
    return max((a.shape[0] for a, _ in pairs.values()), default=0)


class MergedTier:
    """Merged virtual adapters by name (in the slots' format), least recently used out past
    `capacity` bytes of tensors, never one `pinned(name)` says a request needs; the newest
    stays even when it alone is over the capacity (its request is about to run). Not
    thread-safe: the registry calls it under its lock."""

    def __init__(self, capacity_bytes: int, pinned: Callable[[str], bool]):
        self.cache = CpuCache(capacity_bytes, pinned=pinned)
        self.merges = 0  # adapters merged and put here
        self.evictions = 0

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @capacity.setter
    def capacity(self, nbytes: int) -> None:
        self.cache.capacity = int(nbytes)

    def __contains__(self, name: str) -> bool:
        return name in self.cache

    def get(self, name: str) -> Adapter | None:
        """The merged adapter `name` (now the most recently used), or None."""
        entry = self.cache.get(name)
        return None if entry is None else entry.adapter

    def put(self, name: str, adapter: Adapter) -> list[str]:
        """Keep a newly merged adapter; return the names evicted to make room."""
        evicted = self.cache.put(name, adapter, (), keep=True)
        self.merges += 1
        self.evictions += len(evicted)
        return evicted

    def stats(self) -> dict:
        """mb (tensor bytes held, in MB), adapters, merges, evictions."""
        return {
            "mb": self.cache.nbytes / MB,
            "adapters": len(self.cache),
            "merges": self.merges,
            "evictions": self.evictions,
        }
