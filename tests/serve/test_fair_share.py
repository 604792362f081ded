"""Fair share between clients: the Virtual Token Counter's admission order, its counter lift,
preemption toward an even split, FCFS kept as a policy; and the engine's greedy output
unchanged when a request is preempted and resumed."""

from __future__ import annotations

import pytest
from serve_helpers import tiny_base

from lorafleet.errors import LorafleetError
from lorafleet.serve import Engine, SamplingParams
from lorafleet.serve.fair_share import (
    OUTPUT_WEIGHT,
    PROMPT_WEIGHT,
    FirstComeFirstServed,
    VirtualTokenCounter,
    admission_policy,
    client_of,
)
from lorafleet.serve.scheduler import Scheduler
from lorafleet.serve.sequence import Sequence, Status


class Gate:
    def __init__(self, resident=()):
        self.resident = set(resident)

    def adapter_ready(self, name):
        return name is None or name in self.resident

    def slot_of(self, name):
        return 0 if name is None else 1


class Slots:
    """KVCache's slot API (free_slots, allocate, free) over a set, no tensors."""

    def __init__(self, n: int):
        self.unused = set(range(n))

    @property
    def free_slots(self) -> int:
        return len(self.unused)

    def allocate(self) -> int:
        slot = min(self.unused)
        self.unused.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        self.unused.add(slot)


class Sim:
    """A scheduler stepped without a model: every scheduled sequence yields one token per
    step and finishes after `max_tokens`; `admitted` records (step, request id) in order."""

    def __init__(self, policy, batch: int = 2, budget: int = 64, resident=()):
        self.sched = Scheduler(Slots(batch), Gate(resident), batch, budget, policy)
        self.ids = iter(range(10_000))
        self.steps = 0
        self.admitted: list[tuple[int, int]] = []
        self.first_token: dict[int, int] = {}
        self.seqs: dict[int, Sequence] = {}

    def add(self, tenant, n=1, prompt=4, max_tokens=4, adapter=None) -> list[int]:
        out = []
        for _ in range(n):
            rid = next(self.ids)
            seq = Sequence(
                rid, [1] * prompt, adapter, SamplingParams(max_tokens=max_tokens), tenant=tenant
            )
            self.seqs[rid] = seq
            self.sched.add(seq)
            out.append(rid)
        return out

    def step(self):
        batch = self.sched.schedule()
        self.steps += 1
        for seq in batch.prefill:
            self.admitted.append((self.steps, seq.request_id))
        for seq in batch.prefill + batch.decode:
            seq.num_cached = seq.num_tokens
            seq.generated.append(7)
            self.first_token.setdefault(seq.request_id, self.steps)
            if len(seq.generated) >= seq.params.max_tokens:
                self.sched.remove(seq)
        return batch

    def run(self, steps=1000):
        for _ in range(steps):
            if not self.sched.waiting and not self.sched.running:
                return
            self.step()


def order(sim: Sim) -> list[int]:
    return [rid for _, rid in sim.admitted]


def test_a_flooding_client_does_not_starve_another():
    """A queues 12 requests, B one after them: with the counter B runs within A's first few
    (its fair share); first come first served makes it wait for all of A's."""
    for policy, expect_b_before in (("fair", 2), ("fcfs", 12)):
        sim = Sim(policy, batch=2)
        a = sim.add("A", 12)
        (b,) = sim.add("B")
        sim.run()
        assert sorted(order(sim)) == sorted([*a, b])  # everyone served once
        before_b = order(sim).index(b)
        if policy == "fair":
            assert before_b <= expect_b_before, order(sim)
            assert sim.first_token[b] == 1  # admitted in the very first step
        else:
            assert before_b == expect_b_before
            assert order(sim) == [*a, b]


def test_two_backlogged_clients_alternate_by_tokens():
    """Equal requests from two backlogged clients: admissions alternate (equal service)."""
    sim = Sim("fair", batch=1)
    a = sim.add("A", 4)
    b = sim.add("B", 4)
    sim.run()
    assert order(sim) == [a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]]


def test_counter_lift_idle_time_banks_no_credit():
    vtc = VirtualTokenCounter()
    sim = Sim(vtc, batch=1)
    sim.add("A", 3, prompt=4, max_tokens=4)
    for _ in range(5):
        sim.step()  # A's first request ran its 4 steps, its second was admitted
    a_counter = vtc.counter(("tenant", "A"))
    assert a_counter == 2 * 4 * PROMPT_WEIGHT + 5 * OUTPUT_WEIGHT
    sim.add("B")  # A has a request waiting: B is lifted to A's counter, not left at 0
    assert vtc.counter(("tenant", "B")) == a_counter
    # C was served, went idle while A was served alone, and comes back with A backlogged:
    # lifted to A's counter, the two alternate (at 0 it would take two turns in a row).
    sim = Sim(VirtualTokenCounter(), batch=1)
    sim.add("C")
    sim.run()
    a = sim.add("A", 10)
    for _ in range(12):
        sim.step()  # A's first three requests
    c = sim.add("C", 3)
    sim.run()
    assert order(sim)[4:10] == [a[3], c[0], a[4], c[1], a[5], c[2]]
    # With nothing waiting, a client is lifted to the one that last left the queue.
    idle = Sim(VirtualTokenCounter(), batch=2)
    idle.add("C")
    idle.run()
    idle.add("A", 2)
    idle.run()
    a_after = idle.sched.policy.counter(("tenant", "A"))
    assert a_after > 0 and idle.sched.policy.last_left == ("tenant", "A")
    idle.add("C")
    assert idle.sched.policy.counter(("tenant", "C")) == a_after


def test_fcfs_keeps_arrival_order_across_clients():
    sim = Sim("fcfs", batch=2)
    ids = []
    for tenant in ("A", "A", "B", "A", "C", "B", "A"):
        ids += sim.add(tenant)
    sim.run()
    assert order(sim) == ids
    assert sim.sched.preemptions == 0
    assert isinstance(sim.sched.policy, FirstComeFirstServed)


def test_preemption_gives_a_newcomer_a_slot_and_never_thrashes():
    sim = Sim("fair", batch=4)
    a = sim.add("A", 8, max_tokens=20)
    sim.step()
    assert [s.request_id for s in sim.sched.running] == a[:4]
    sim.step()
    (b,) = sim.add("B", max_tokens=20)
    batch = sim.step()
    assert [s.request_id for s in batch.prefill] == [b]  # at once, not after A's 20 tokens
    assert batch.decode == []  # its prefill runs alone: A's rows wait this one step
    assert sim.sched.preemptions == 1
    victim = sim.seqs[a[3]]  # A's most recently admitted
    assert victim.status is Status.WAITING and victim.kv_slot is None and victim.num_cached == 0
    assert list(sim.sched.waiting)[0] is victim  # back at its arrival place
    assert len(victim.generated) == 2  # what it generated stays
    # A second B request: B holds 1, A 3 -> one more of A's slots (an even split) once A's
    # counter is back above B's (A's rows skipped the prefill-only step, so were not charged) ...
    sim.add("B", max_tokens=20)
    for _ in range(3):
        sim.step()
    assert sim.sched.preemptions == 2
    # ... but a third does not preempt again (2 vs 2), and the A/B split stays.
    sim.add("B", max_tokens=20)
    for _ in range(5):
        sim.step()
    assert sim.sched.preemptions == 2
    sim.run()
    resumed = [s for s in sim.seqs.values() if s.tenant == "A"]
    assert all(len(s.generated) == 20 and s.finished for s in resumed)
    # Preemption is the fair policy's: off, the newcomer waits for a slot.
    paper = Sim(VirtualTokenCounter(preempt=False), batch=4)
    paper.add("A", 8, max_tokens=20)
    paper.step()
    paper.add("B")
    assert not paper.step().prefill and paper.sched.preemptions == 0


def test_rules_kept_adapters_not_resident_and_the_token_budget():
    sim = Sim("fair", batch=4, budget=10, resident={"on"})
    off = sim.add("A", adapter="off")
    on = sim.add("B", adapter="on")
    batch = sim.step()
    assert [s.request_id for s in batch.prefill] == on  # the other waits for its adapter
    assert sim.seqs[off[0]].status is Status.WAITING
    big = Sim("fair", batch=4, budget=10)
    first = big.add("A", prompt=6)
    second = big.add("B", prompt=6)  # 6 + 6 > 10: the next step
    assert [s.request_id for s in big.step().prefill] == first
    assert [s.request_id for s in big.step().prefill] == second


def test_client_key_and_bad_schedule():
    seq = Sequence(0, [1], "alpha", SamplingParams(), tenant=None)
    assert client_of(seq) == ("adapter", "alpha")
    seq.tenant = "alpha"  # a tenant named like an adapter is another client
    assert client_of(seq) == ("tenant", "alpha")
    assert client_of(Sequence(1, [1], None, SamplingParams())) == ("adapter", None)
    with pytest.raises(LorafleetError, match="schedule must be one of fcfs, fair"):
        admission_policy("round-robin")
    with pytest.raises(LorafleetError, match="weights must be > 0"):
        VirtualTokenCounter(prompt_weight=0)


def test_idle_clients_are_forgotten():
    """Counters of clients gone idle at or below the floor are dropped (bounded table)."""
    vtc = VirtualTokenCounter()
    sim = Sim(vtc, batch=4)
    for i in range(50):
        sim.add(f"t{i}")
        sim.run()
    assert len(vtc.counters) <= 2 and not vtc.waiting and not vtc.running


def test_engine_output_is_the_same_when_preempted(tokenizer, prompt_ids):
    """Greedy tokens of a request preempted mid-way (and re-prefilled) equal its tokens
    when it runs alone; the newcomer that preempted it was admitted at once."""
    greedy = SamplingParams(max_tokens=10)
    alone = Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=64, max_batch_size=2)
    expected = [o.token_ids for o in alone.generate([(p, None, greedy) for p in prompt_ids[:3]])]
    engine = Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=64, max_batch_size=2)
    a = [engine.add_request(p, None, greedy, tenant="A") for p in prompt_ids[:2]]
    for _ in range(3):
        engine.step()
    b = engine.add_request(prompt_ids[2], None, greedy, tenant="B")
    engine.step()
    assert engine.scheduler.preemptions == 1
    assert b in {s.request_id for s in engine.scheduler.running}
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step())
    assert [outputs[r].token_ids for r in [*a, b]] == expected
    assert engine.stats()["kv_used_slots"] == 0
    with pytest.raises(LorafleetError, match="schedule must be"):
        Engine(tiny_base(tokenizer), max_slots=0, max_seq_len=64, schedule="lifo")
