"""Continuous-batching policy: who is prefilled, who is decoded, who waits (no tensors here)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from lorafleet.serve.fair_share import AdmissionPolicy, admission_policy, client_of
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


class PrefixReuse(Protocol):
    """What the scheduler asks a prefix cache (serve/prefix_cache.py answers)."""

    def cached_tokens(self, seq: Sequence) -> int:
        """Leading prefill tokens of `seq` its admission would reuse now (changes nothing)."""
        ...

    def attach(self, seq: Sequence) -> int:
        """At admission (seq holds its KV slot and adapter slot): put the reusable prefix in
        its slot, set seq.prefix_hit and return it."""
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
    """Admission between steps within `max_batch_size` running sequences, a prefill token
    budget of `max_batch_tokens` per step, and the KV cache's free slots; the order is the
    `policy`'s (serve/fair_share.py: "fair", the Virtual Token Counter, by default, or "fcfs").

    Each step decodes every running sequence and prefills the newly admitted ones in the same
    forward. Only waiting requests whose adapters are resident are candidates (the others
    keep their place and wait for their adapters); the policy picks among the candidates
    one at a time. A pick that does not fit the step's token budget stops admission for this
    step, so long prompts are not overtaken forever. A pick with no slot free (batch full or
    no KV memory) may take the place of a running sequence the policy names (preemption:
    that one frees its KV slot and waits again; when admitted again it re-prefills its prompt
    and the tokens it generated, so only sequences of at most `max_batch_tokens` tokens are
    offered); else its client's requests wait and the next pick is tried (only a preemption
    can admit while no slot is free, so first come first served admits nothing more). A step
    that preempted prefills only (its running rows skip that one step's decode): the admitted
    client's first token then waits for a prefill-only forward, not a full batch. The
    engine rejects prompts longer than the budget when they are added, so every waiting
    request fits an empty step.

    With a `prefix` cache, a request's admission reuses the K/V of its cached leading tokens
    (copied into its slot) and counts only the rest against the token budget."""

    def __init__(
        self,
        kv: KVCache,
        gate: AdapterGate,
        max_batch_size: int,
        max_batch_tokens: int,
        policy: str | AdmissionPolicy = "fair",
        prefix: PrefixReuse | None = None,
    ):
        self.kv = kv
        self.prefix = prefix
        self.gate = gate
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.policy = admission_policy(policy)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0  # running sequences sent back to the queue, in total

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self.policy.arrive(seq)

    def schedule(self) -> Batch:
        """Admit what fits (allocating KV slots, fixing each one's adapter slot; preempting
        where the policy says), then return the admitted sequences as prefill and the other
        running ones as decode; the policy is charged for every token the batch yields."""
        budget = self.max_batch_tokens
        candidates = [
            s for s in self.waiting if all(self.gate.adapter_ready(n) for n in s.adapters)
        ]
        admitted: list[Sequence] = []
        preempted = False
        while candidates:
            seq = self.policy.pick(candidates)
            rows = seq.num_tokens - (self.prefix.cached_tokens(seq) if self.prefix else 0)
            if rows > budget:
                break
            candidates.remove(seq)
            if not self._room():
                fresh = set(map(id, admitted))
                resumable = [
                    s
                    for s in self.running
                    if id(s) not in fresh and s.num_tokens <= self.max_batch_tokens
                ]
                victim = self.policy.victim(seq, resumable) if resumable else None
                if victim is None:
                    # Its client's other requests wait too (a victim depends on the client
                    # only); another client's pick may still preempt.
                    client = client_of(seq)
                    candidates = [s for s in candidates if client_of(s) != client]
                    continue
                self._preempt(victim)
                preempted = True
            budget -= rows
            self._admit(seq)
            admitted.append(seq)
        fresh = set(map(id, admitted))
        # Decode rows in KV-slot order: slots are handed out lowest first, so they often form a
        # contiguous range that attention reads as a view of the cache instead of a gather.
        decode = sorted((s for s in self.running if id(s) not in fresh), key=lambda s: s.kv_slot)
        if preempted:
            # A preemption admits a client that was held out of a full batch: its prefill runs
            # alone this step (the decode rows wait one step), so its first token comes after
            # a short prefill-only forward, not after a full batch's decode as well.
            decode = []
        # Punica's layout: rows of one adapter contiguous, so the multi-LoRA layers take the
        # segmented path without a gather (sorted() is stable: admission order within an adapter).
        batch = Batch(prefill=sorted(admitted, key=lambda s: s.lora_slot), decode=decode)
        self.policy.charge(batch.prefill + batch.decode)  # each yields one token this step
        return batch

    def _room(self) -> bool:
        return len(self.running) < self.max_batch_size and self.kv.free_slots > 0

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.kv_slot = self.kv.allocate()
        if seq.mixture is None:  # its adapters are pinned while it runs (in_use)
            seq.lora_slot = self.gate.slot_of(seq.adapter)
        else:
            seq.mix_slots = tuple(self.gate.slot_of(name) for name in seq.adapters)
        if self.prefix is not None:
            self.prefix.attach(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.policy.admit(seq, len(seq.prompt_ids))

    def _preempt(self, seq: Sequence) -> None:
        """Send a running sequence back to the queue, at its arrival place (request ids grow
        with arrival): its KV slot is freed and its whole prefix is recomputed when it runs
        again; what it generated stays (and was streamed) as it is."""
        self.policy.leave(seq, running=True)
        self.running.remove(seq)
        self.kv.free(seq.kv_slot)
        seq.kv_slot, seq.num_cached, seq.status = None, 0, Status.WAITING
        seq.prefix_hit = 0
        later = next((i for i, s in enumerate(self.waiting) if s.request_id > seq.request_id), None)
        self.waiting.insert(len(self.waiting) if later is None else later, seq)
        self.policy.arrive(seq)
        self.preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its KV slot."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.kv_slot)
            seq.kv_slot = None
            self.policy.leave(seq, running=True)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
            self.policy.leave(seq, running=False)
        seq.status = Status.FINISHED

    def in_use(self, adapter: str) -> int:
        """How many running sequences pin `adapter`, alone or in a mixture (it must not be
        unloaded while > 0)."""
        return sum(1 for s in self.running if adapter in s.adapters)
