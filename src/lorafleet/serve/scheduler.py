"""Continuous-batching policy: who is prefilled, who is decoded, who waits (no tensors here)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from lorafleet.serve.kv_cache import KVCache
from lorafleet.serve.sequence import Sequence, Status


class AdapterGate(Protocol):
    """What the scheduler asks about adapters (the engine's SlotTable answers; a
    registry makes adapters resident through the engine's load_adapter)."""

    def adapter_ready(self, name: str | None) -> bool:
        """True when `name` (None = the base) is resident in a slot now."""
        ...

    def slot_of(self, name: str | None) -> int:
        """The slot of a ready adapter (0 for the base)."""
        ...


@dataclass
class Batch:
    """One step's work: sequences to prefill (packed first, grouped by adapter slot) and
    running sequences to decode by one token each."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    """FIFO admission between steps within `max_batch_size` running sequences, a prefill token
    budget of `max_batch_tokens` per step, and the KV cache's free slots.

    Each step decodes every running sequence and prefills the newly admitted ones in the same
    forward. A waiting request whose adapter is not resident is skipped (it keeps its place and
    others behind it may go); a request that does not fit the budget stops admission for this
    step, so long prompts are not overtaken forever. The engine rejects prompts longer than the
    budget when they are added, so every waiting request fits an empty step."""

    def __init__(self, kv: KVCache, gate: AdapterGate, max_batch_size: int, max_batch_tokens: int):
        self.kv = kv
        self.gate = gate
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        """Admit what fits (allocating KV slots, fixing each one's adapter slot), then return
        the admitted sequences as prefill and all earlier running ones as decode."""
        # Decode rows in KV-slot order: slots are handed out lowest first, so they often form a
        # contiguous range that attention reads as a view of the cache instead of a gather.
        batch = Batch(decode=sorted(self.running, key=lambda s: s.kv_slot))
        budget = self.max_batch_tokens
        for seq in list(self.waiting):
            if len(self.running) >= self.max_batch_size or self.kv.free_slots == 0:
                break
            if not all(self.gate.adapter_ready(name) for name in seq.adapters):
                continue  # an adapter is loading (or was evicted): it waits, others may go
            if len(seq.prompt_ids) > budget:
                break
            budget -= len(seq.prompt_ids)
            self.waiting.remove(seq)
            seq.kv_slot = self.kv.allocate()
            if seq.mixture is None:  # its adapters are pinned while it runs (in_use)
                seq.lora_slot = self.gate.slot_of(seq.adapter)
            else:
                seq.mix_slots = tuple(self.gate.slot_of(name) for name in seq.adapters)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.prefill.append(seq)
        # Punica's layout: rows of one adapter contiguous, so the multi-LoRA layers take the
        # segmented path without a gather (sorted() is stable: FIFO within an adapter).
        batch.prefill = sorted(batch.prefill, key=lambda s: s.lora_slot)
        return batch

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its KV slot."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.kv_slot)
            seq.kv_slot = None
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def in_use(self, adapter: str) -> int:
        """How many running sequences pin `adapter`, alone or in a mixture (it must not be
        unloaded while > 0)."""
        return sum(1 for s in self.running if adapter in s.adapters)
