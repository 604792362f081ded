"""Who the scheduler admits next: first come first served, or a fair share of tokens between
clients by a Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models",
OSDI'24). Bookkeeping over sequences only, no tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from typing import Protocol

from lorafleet.errors import LorafleetError
from lorafleet.serve.sequence import Sequence

SCHEDULES = ("fcfs", "fair")
# The paper's example cost weights: a prompt token counts 1, a generated token 2 (a decode step
# costs more per token than a batched prefill position). Counters are in these units.
PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0

ClientKey = tuple[str, str | None]


def client_of(seq: Sequence) -> ClientKey:
    """Whose share a request counts against: its tenant ("tenant", name) when the request
    carries one (the API key's tenant under `--auth`), else its adapter ("adapter", name or
    a mixture's label; None = the base model, one client)."""
    if seq.tenant is not None:
        return ("tenant", seq.tenant)
    return ("adapter", seq.adapter)


class AdmissionPolicy(Protocol):
    """The scheduler's one replaceable piece: which waiting request is admitted next, and
    whether a running one gives its place up for it. The scheduler calls the hooks in this
    order in a request's life: `arrive` (it joined the waiting queue), `admit` (it got a KV
    slot and is prefilled this step; `prompt_tokens` new prompt positions), `charge` once
    per step for every sequence that yields a token in it, and `leave` (it finished or was
    cancelled: from the queue when `running` is False). A preempted request gets `leave`
    (running) then `arrive` again."""

    name: str

    def arrive(self, seq: Sequence) -> None: ...

    def pick(self, candidates: Seq[Sequence]) -> Sequence:
        """The next to admit among `candidates` (waiting requests that could run now, in
        queue order; never empty)."""
        ...

    def admit(self, seq: Sequence, prompt_tokens: int) -> None: ...

    def charge(self, seqs: Seq[Sequence]) -> None: ...

    def leave(self, seq: Sequence, running: bool) -> None: ...

    def victim(self, seq: Sequence, running: Seq[Sequence]) -> Sequence | None:
        """A request among `running` (admission order) to preempt so that `seq`, picked
        while no slot is free, runs now; None to let `seq` wait for a slot. Whether there
        is one depends on `client_of(seq)` only: after a None the scheduler asks for none of
        that client's other requests in this step."""
        ...


class FirstComeFirstServed:
    """Queue order: the earliest waiting request that can run goes first; nothing is
    preempted and nothing is counted."""

    name = "fcfs"

    def arrive(self, seq: Sequence) -> None:
        pass

    def pick(self, candidates: Seq[Sequence]) -> Sequence:
        return candidates[0]

    def admit(self, seq: Sequence, prompt_tokens: int) -> None:
        pass

    def charge(self, seqs: Seq[Sequence]) -> None:
        pass

    def leave(self, seq: Sequence, running: bool) -> None:
        pass

    def victim(self, seq: Sequence, running: Seq[Sequence]) -> Sequence | None:
        return None


class VirtualTokenCounter:
    """Fair share of tokens between clients (`client_of`): the Virtual Token Counter.

    Each client has a counter of the service it got, in weighted tokens: `admit` adds
    `prompt_weight` per prompt token (once per request: a preempted request's recomputed
    prefix is not charged again), `charge` adds `output_weight` per generated token.
    - Lift (idle time banks no credit): when a client's first waiting request arrives (it had
      none waiting), its counter becomes max(its counter, the smallest counter among the
      other clients with waiting requests), or, when no other client has one, max(its
      counter, the counter of the client whose request last left the queue). This is the
      paper's rule: "active" means having a request in the waiting queue (a client that only
      has running requests is lifted when it queues again, so running below its share does
      not bank credit either).
    - Pick: the waiting candidate whose client has the smallest counter; among equal
      counters (a newcomer is lifted to exactly another's), the client with fewer running
      requests, then the earliest in the queue (one client's requests run in arrival order).
    - Preemption (beyond the paper, which admits only as slots free): the paper's admission
      can act only when a running request ends, so a client arriving while one other client
      holds every batch slot waits up to a whole request of theirs. So a request picked with
      no slot free takes the place of the most recently admitted running request (least work
      lost) of the client with the largest counter among those that hold at least two more
      running requests than the picked client and whose counter is not below its own (a
      newcomer is lifted to exactly the heavy client's counter); that request goes back to
      the queue and later re-prefills prompt + generated tokens. A preemption narrows the
      gap in running requests by two and needs a gap of two, so two clients never take
      slots back and forth. `preempt=False` gives the paper's admission alone.
    Counters of clients with nothing waiting or running are forgotten once they are at or
    below the lift floor (they would be lifted to at least it anyway), so the table stays
    as small as the set of clients seen recently."""

    name = "fair"

    def __init__(
        self,
        prompt_weight: float = PROMPT_WEIGHT,
        output_weight: float = OUTPUT_WEIGHT,
        preempt: bool = True,
    ):
        if not prompt_weight > 0 or not output_weight > 0:
            raise LorafleetError(
                f"token weights must be > 0, got prompt {prompt_weight!r} and "
                f"output {output_weight!r}"
            )
        self.prompt_weight, self.output_weight, self.preempt = prompt_weight, output_weight, preempt
        self.counters: dict[ClientKey, float] = {}
        self.waiting: Counter[ClientKey] = Counter()
        self.running: Counter[ClientKey] = Counter()
        self.last_left: ClientKey | None = None

    def counter(self, client: ClientKey) -> float:
        return self.counters.get(client, 0.0)

    def floor(self, besides: ClientKey | None = None) -> float:
        """What an arriving client is lifted to: the smallest counter of the other clients
        with waiting requests, else the counter of the client that last left the queue."""
        waiting = [self.counter(c) for c, n in self.waiting.items() if n and c != besides]
        if waiting:
            return min(waiting)
        return self.counter(self.last_left) if self.last_left is not None else 0.0

    def arrive(self, seq: Sequence) -> None:
        client = client_of(seq)
        if not self.waiting[client]:
            self.counters[client] = max(self.counter(client), self.floor(besides=client))
        self.waiting[client] += 1

    def pick(self, candidates: Seq[Sequence]) -> Sequence:
        def key(seq: Sequence) -> tuple[float, int]:
            client = client_of(seq)
            return self.counter(client), self.running[client]

        return min(candidates, key=key)  # min() keeps the first of equal keys: queue order

    def admit(self, seq: Sequence, prompt_tokens: int) -> None:
        client = client_of(seq)
        self.waiting[client] -= 1
        self.running[client] += 1
        self.last_left = client
        if not seq.generated:  # a resumed request's prompt was charged when it first ran
            self.counters[client] = self.counter(client) + self.prompt_weight * prompt_tokens

    def charge(self, seqs: Seq[Sequence]) -> None:
        for seq in seqs:
            client = client_of(seq)
            self.counters[client] = self.counter(client) + self.output_weight

    def leave(self, seq: Sequence, running: bool) -> None:
        client = client_of(seq)
        (self.running if running else self.waiting)[client] -= 1
        if not running:
            self.last_left = client
        self._forget_idle()

    def victim(self, seq: Sequence, running: Seq[Sequence]) -> Sequence | None:
        if not self.preempt:
            return None
        mine = client_of(seq)
        floor = self.running[mine] + 2
        over = [
            c
            for c, n in self.running.items()
            if c != mine and n >= floor and self.counter(c) >= self.counter(mine)
        ]
        for client in sorted(over, key=self.counter, reverse=True):
            for other in reversed(running):
                if client_of(other) == client:
                    return other
        return None

    def _forget_idle(self) -> None:
        floor = self.floor()
        for client in [c for c in self.counters if not self.waiting[c] and not self.running[c]]:
            if client != self.last_left and self.counters[client] <= floor:
                del self.counters[client]
        for table in (self.waiting, self.running):
            for client in [c for c, n in table.items() if n <= 0]:
                del table[client]


def admission_policy(schedule: str | AdmissionPolicy) -> AdmissionPolicy:
    """The policy for `--schedule` ("fcfs" or "fair"), or `schedule` itself when it is one."""
    if not isinstance(schedule, str):
        return schedule
    if schedule == "fcfs":
        return FirstComeFirstServed()
    if schedule == "fair":
        return VirtualTokenCounter()
    raise LorafleetError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
