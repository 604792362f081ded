"""Adapter-aware prefix caching: prompt KV blocks kept by adapter identity and tokens, LRU."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorafleet.adapters import Adapter
from lorafleet.errors import LorafleetError
from lorafleet.serve.kv_cache import KVCache
from lorafleet.serve.sequence import Sequence

BLOCK_TOKENS = 16  # tokens per cached block: the unit of lookup, storage and eviction
DEFAULT_BYTES = 256 * 1024**2  # the engine's default budget (lorafleet serve --prefix-cache-bytes)


def adapter_digest(adapter: Adapter) -> str:
    """sha256 over what an adapter computes with: its config (canonical JSON) and every
    tensor's name, dtype, shape and bytes (not its metadata or path). Two loads of the same
    content agree; a re-upload with any other weight or scale does not."""
    h = hashlib.sha256()
    h.update(json.dumps(adapter.config, sort_keys=True, default=str).encode())
    for name in sorted(adapter.tensors):
        t = adapter.tensors[name].detach()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.reshape(-1).contiguous().cpu()  # [numel], a copy only when it must move
        h.update(flat.view(torch.uint8).numpy().data)  # the raw bytes, any dtype
    return h.hexdigest()


@dataclass(eq=False)
class _Block:
    """One cached block: its key, the KV of its BLOCK_TOKENS positions, its tree links."""

    uid: int  # what its children's keys name it by (never reused)
    key: tuple
    index: int  # its row of the pool: PrefixCache.pool[index] is its K/V
    parent: _Block | None
    children: set = field(default_factory=set)


class PrefixCache:
    """Keys and values of prompt prefixes, kept after a prefill and copied into the KV slot of a
    later request that starts with the same tokens under the same adapter, so its prefill runs
    only from there (ModelRunner.build: rows from `seq.prefix_hit`).

    Keys: block i of a prompt (tokens [16 i, 16 i + 16)) is found by (its parent block, its 16
    tokens), block 0 by (the request's owner, its tokens), so a hit means the whole prefix up to
    that block is equal, exactly (dict equality, no hash collisions). The owner is the adapter's
    identity, name and content digest (`set_identity`, on every load: an adapter re-uploaded
    under the same name never reuses its old KV); ("base",) for base requests; a fixed-weight
    mixture is owned by its (name, digest, weight) list. Requests never share KV across owners,
    so adapters never share KV for layers they touch. Bypassed (no lookup, no store): mixtures
    with a gate (MoLE: its per-row weights are its own state) and owners whose identity is not
    known. Stored, never looked up: a request asking prompt_logprobs needs every prompt row's
    logits, so it prefills from 0 (its blocks still serve later requests).

    At least one prompt token is always prefilled (the request's first logits come from it), so
    at most (n - 1) // 16 blocks are reused. Only full blocks of what a prefill computed are
    stored (the prompt; for a resumed sequence also what it had generated); decoded tokens are
    not. Memory: one pool of `budget_bytes // block_bytes` blocks, allocated uninitialised at
    creation (on a CPU its pages are taken as blocks first fill them, and kept: rows of evicted
    blocks are reused); the least recently used block leaves first, and a lookup or store
    touches its chain leaf first, so a shared root outlives the tails that hang off it (evicting
    a block drops the blocks under it, which could not be reached any more). 0 bytes: off.
    Owned by the engine; called under its lock (no locking here)."""

    def __init__(self, kv: KVCache, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
            raise LorafleetError(
                f"prefix_cache_bytes must be an integer >= 0, got {budget_bytes!r}"
            )
        layers, _, kv_heads, _, head_dim = kv.k.shape
        self.kv, self.block_tokens = kv, block_tokens
        self.block_bytes = 2 * layers * kv_heads * block_tokens * head_dim * kv.k.element_size()
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // self.block_bytes  # blocks
        # [blocks, 2 (k, v), layers, kv_heads, block_tokens, head_dim]
        shape = (self.capacity, 2, layers, kv_heads, block_tokens, head_dim)
        self.pool: Tensor = torch.empty(shape, dtype=kv.k.dtype, device=kv.k.device)
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._free = list(range(self.capacity))[::-1]  # pool rows no block holds (a stack)
        self._identities: dict[str, str] = {}  # resident adapter name -> content digest
        self._uids = itertools.count()
        self.hits = 0  # requests that reused at least one block
        self.misses = 0  # requests that looked up and reused none
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the cache
        self.evictions = 0  # blocks evicted (their subtrees included)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def bytes(self) -> int:
        """Bytes the cached blocks hold now (<= budget_bytes)."""
        return len(self._blocks) * self.block_bytes

    def stats(self) -> dict:
        return {
            "prefix_cache_hits": self.hits,
            "prefix_cache_misses": self.misses,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_blocks": len(self._blocks),
            "prefix_cache_bytes": self.bytes,
            "prefix_cache_budget_bytes": self.budget_bytes,
            "prefix_cache_evictions": self.evictions,
        }

    def clear(self) -> None:
        """Drop every block (the pool stays allocated); the counters stay."""
        self._blocks.clear()
        self._free = list(range(self.capacity))[::-1]

    # -- adapter identities -----------------------------------------------------------------

    def set_identity(self, name: str, digest: str) -> None:
        """`name` now holds the adapter with this content digest (adapter_digest)."""
        self._identities[name] = digest

    def forget(self, name: str) -> None:
        """`name` left its slot: its requests are not admitted until it is loaded again (and
        named again); its blocks stay until evicted, found again if the same content returns."""
        self._identities.pop(name, None)

    def owner(self, seq: Sequence) -> Hashable | None:
        """Whose KV `seq`'s rows compute: the root of its keys, or None = bypass the cache."""
        if seq.mixture is None:
            if seq.adapter is None:
                return ("base",)
            digest = self._identities.get(seq.adapter)
            return None if digest is None else ("adapter", seq.adapter, digest)
        if seq.mixture.gate is not None:
            return None
        parts = []
        for name, weight in seq.mixture.entries:
            if name not in self._identities:
                return None
            parts.append((name, self._identities[name], weight))
        return ("mixture", tuple(parts))

    # -- lookup (admission) and store (after a prefill) -------------------------------------

    def cached_tokens(self, seq: Sequence) -> int:
        """Prompt tokens of `seq` that `attach` would copy now (a multiple of the block size,
        below its prefill length); nothing changes."""
        return len(self._match(seq)) * self.block_tokens

    def attach(self, seq: Sequence) -> int:
        """At admission (seq holds its KV slot): copy the longest cached prefix of its prefill
        tokens into the slot, set `seq.prefix_hit` to its length and return it."""
        seq.prefix_hit = 0
        if not self._looks_up(seq):
            return 0
        chain = self._match(seq)
        if not chain:
            self.misses += 1
            return 0
        k_cache, v_cache = self.kv.k, self.kv.v  # [layers, S, kv_heads, max_len, head_dim]
        b = self.block_tokens
        for i, block in enumerate(chain):
            k_cache[:, seq.kv_slot, :, i * b : (i + 1) * b] = self.pool[block.index, 0]
            v_cache[:, seq.kv_slot, :, i * b : (i + 1) * b] = self.pool[block.index, 1]
        self._touch(chain)
        self.hits += 1
        seq.prefix_hit = len(chain) * b
        self.hit_tokens += seq.prefix_hit
        return seq.prefix_hit

    def store(self, seq: Sequence) -> int:
        """After `seq`'s prefill ran (its slot holds the K/V of all its prefill tokens): keep
        every full block not yet cached, evicting the least recently used past the budget.
        Returns the number of blocks added."""
        owner = self.owner(seq) if self.enabled else None
        if owner is None:
            return 0
        tokens, b = seq.prefill_ids, self.block_tokens
        chain: list[_Block] = []
        added = 0
        parent_key: Hashable = owner
        for i in range(len(tokens) // b):
            key = (parent_key, tuple(tokens[i * b : (i + 1) * b]))
            block = self._blocks.get(key)
            if block is None:
                self._touch(chain)  # its ancestors must not be the ones evicted for it
                index = self._free_row(protect=chain)
                if index is None:
                    break  # the budget holds fewer blocks than this chain
                k_cache, v_cache = self.kv.k, self.kv.v
                self.pool[index, 0].copy_(k_cache[:, seq.kv_slot, :, i * b : (i + 1) * b])
                self.pool[index, 1].copy_(v_cache[:, seq.kv_slot, :, i * b : (i + 1) * b])
                block = _Block(next(self._uids), key, index, chain[-1] if chain else None)
                if block.parent is not None:
                    block.parent.children.add(block)
                self._blocks[key] = block
                added += 1
            chain.append(block)
            parent_key = block.uid  # an int: never equal to an owner (a tuple)
        self._touch(chain)
        return added

    # -- internals --------------------------------------------------------------------------

    def _looks_up(self, seq: Sequence) -> bool:
        asks_prompt_logprobs = seq.params.prompt_logprobs is not None and not seq.generated
        return self.enabled and not asks_prompt_logprobs and self.owner(seq) is not None

    def _match(self, seq: Sequence) -> list[_Block]:
        """The cached chain of `seq`'s leading full blocks, leaving >= 1 token to prefill."""
        if not self._looks_up(seq):
            return []
        tokens, b = seq.prefill_ids, self.block_tokens
        chain: list[_Block] = []
        parent_key = self.owner(seq)
        for i in range((len(tokens) - 1) // b):
            block = self._blocks.get((parent_key, tuple(tokens[i * b : (i + 1) * b])))
            if block is None:
                break
            chain.append(block)
            parent_key = block.uid
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        """Mark a chain used now, leaf first: its root ends most recent (evicted last)."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _free_row(self, protect: list[_Block]) -> int | None:
        """A pool row for a new block: a free one, else the least recently used block's (with
        its subtree); None if that block is in `protect` (or the pool has no rows)."""
        if self._free:
            return self._free.pop()
        if not self._blocks:
            return None
        oldest = next(iter(self._blocks.values()))
        if oldest in protect:
            return None
        self._evict(oldest)
        return self._free.pop()

    def _evict(self, block: _Block) -> None:
        """Drop `block` and every block under it (unreachable without it); free their rows."""
        stack = [block]
        while stack:
            current = stack.pop()
            stack.extend(current.children)
            del self._blocks[current.key]
            self._free.append(current.index)
            self.evictions += 1
        if block.parent is not None:
            block.parent.children.discard(block)
