"""A discrete-event model of a lorafleet fleet on Ray Serve: requests for N adapters routed
over R replicas of K adapter slots each, with Poisson arrivals and Zipf or uniform adapter
draws; the replicas' service times, cold loads and memory come from measured figures, and the
shared adapter store, the Ray controller's routing broadcast and the proxies from documented or
assumed ones (fleet_config.FIGURES says which is which).

Routing policies:
- `affinity`: Ray Serve's multiplexed routing as Ray 2.60's power-of-two router does it
  (request_router.apply_multiplex_routing): the candidates are the replicas the router believes
  hold the adapter (its view lags the replicas by `view_delay_s`), else the replicas holding
  the fewest adapters; of two random candidates the one with fewer ongoing requests takes it if
  it is under `max_ongoing` (Ray's max_ongoing_requests). When that fails (busy holders), the
  request goes to the fewest-adapters replicas that have room, then to any that has room, then
  waits at the router until a replica has room.
- `pow2`: the same router without a model id (power of two choices over every replica).
- `round-robin`: the next replica in turn that has room.

A replica holds at most K adapters (least recently used out, never one a request on the
replica still needs), loads one at a time (store transfer, FIFO over the whole fleet, then
`cold_load_s`), and steps its engine: each step decodes the running rows and prefills the
newly admitted ones (whose adapters are loaded), at most `max_batch` rows and
`max_batch_tokens` prompt tokens. Time to first token = the end of the request's prefill step
minus its arrival, plus the ingress's latency.

Beside the run (not fed back into it): the shared store's load (loads/s x adapter bytes over
its bandwidth); the ingress processes needed (requests + streamed chunks per second over what
one forwards), each of which holds a Ray router; and the controller's routing broadcasts: in
every control loop in which some replica's adapters changed, the whole routing table
(replicas x their adapter ids) to every router."""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.bench.fleet_config import FIGURES, Figures, FleetConfig
from lorafleet.bench.streaming import pct

INF = math.inf
ARRIVE, STEP, LOADED, VIEW = 0, 1, 2, 3


@dataclass(frozen=True)
class Shape:
    """One simulated fleet: how many replicas and how each is sized."""

    replicas: int
    slots: int = 32
    max_batch: int = 32
    max_batch_tokens: int = 2048
    max_ongoing: int = 32
    prompt_tokens: int = 32
    new_tokens: int = 48


class Req:
    """One request as the simulator follows it."""

    __slots__ = ("i", "adapter", "arrival", "replica", "first", "done", "left", "routed", "tried")

    def __init__(self, i: int, adapter: int, arrival: float):
        self.i, self.adapter, self.arrival = i, adapter, arrival
        self.replica = -1
        self.first = self.done = None
        self.left = 0
        self.routed = None  # when it left the router (None while waiting there)
        self.tried = False  # its first routing try is over


class Replica:
    """One replica: its adapters (LRU order, value = when loaded, INF while loading), how many
    of its requests need each, and its engine's queue and batch."""

    __slots__ = ("held", "pins", "waiting", "running", "busy", "ongoing", "loader_free", "blocked")

    def __init__(self):
        self.held: OrderedDict[int, float] = OrderedDict()
        self.pins: dict[int, int] = {}
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.busy = False
        self.ongoing = 0  # routed here and not finished: Ray's queue length of the replica
        self.loader_free = 0.0
        self.blocked: deque[Req] = deque()  # every slot pinned when it came


def workload(
    adapters: int, requests: int, rate: float, popularity: str, zipf_s: float, seed: int
) -> list[tuple[float, int]]:
    """(arrival time, adapter) per request: Poisson arrivals at `rate`/s; adapter k drawn with
    probability proportional to 1/(k+1)^zipf_s (`zipf`) or uniformly."""
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        times.append(t)
    if popularity == "zipf":
        total, cum = 0.0, []
        for k in range(1, adapters + 1):
            total += k**-zipf_s
            cum.append(total)
        drawn = rng.choices(range(adapters), cum_weights=cum, k=requests)
    else:
        drawn = [rng.randrange(adapters) for _ in range(requests)]
    return list(zip(times, drawn, strict=True))


class FleetSim:
    """One run of one policy over one fleet shape; `run` returns its figures."""

    def __init__(self, shape: Shape, figures: Figures, policy: str, seed: int = 0):
        self.s, self.f, self.policy = shape, figures, policy
        self.rng = random.Random(seed + 1)
        self.reps = [Replica() for _ in range(shape.replicas)]
        self.view: list[set[int]] = [set() for _ in range(shape.replicas)]  # the router's
        self.holders: dict[int, set[int]] = {}
        self.pending: deque[Req] = deque()  # waiting at the router
        self.heap: list = []
        self.seq = 0
        self.rr = 0
        self.store_free = 0.0
        self.loads = self.loads_measured = 0
        self.window = (0.0, INF)
        self.measure_from = 0
        self.change_loops: set[int] = set()
        self.tokens_in_window = 0
        self.steps = self.distinct_sum = 0
        self.busy_s = 0.0

    # -- events ------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, r: int, x) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, r, x))

    def run(self, arrivals: list[tuple[float, int]], warmup: float = 0.2) -> dict:
        """Every request of `arrivals` to its end; figures over requests after the first
        `warmup` share (the measured window: their first arrival to the last arrival)."""
        reqs = [Req(i, a, t) for i, (t, a) in enumerate(arrivals)]
        self.measure_from = min(int(len(reqs) * warmup), len(reqs) - 1)
        self.window = (reqs[self.measure_from].arrival, reqs[-1].arrival)
        for q in reqs:
            self._push(q.arrival, ARRIVE, -1, q)
        t0, t1 = self.window
        in_system, area, last = 0, 0.0, 0.0
        while self.heap:
            now, _, kind, r, x = heapq.heappop(self.heap)
            overlap = min(now, t1) - max(last, t0)
            if overlap > 0:
                area += in_system * overlap
            last = now
            if kind == ARRIVE:
                in_system += 1
                if not self._route(x, now):
                    self.pending.append(x)
            elif kind == STEP:
                in_system -= self._step_end(r, x, now)
            elif kind == LOADED:
                rep = self.reps[r]
                if x in rep.held:
                    rep.held[x] = now
                self._kick(r, now)
            else:  # VIEW: the router learns of a replica's change
                adapter, added = x
                group = self.holders.setdefault(adapter, set())
                (self.view[r].add if added else self.view[r].discard)(adapter)
                (group.add if added else group.discard)(r)
        return self._figures(reqs, area)

    # -- routing -----------------------------------------------------------------------------

    def _room(self, r: int) -> bool:
        return self.reps[r].ongoing < self.s.max_ongoing

    def _two_choices(self, candidates: list[int]) -> int | None:
        """Ray's power of two choices: two random candidates, the less busy one if it has room."""
        if len(candidates) > 2:
            candidates = self.rng.sample(candidates, 2)
        best = min(candidates, key=lambda r: (self.reps[r].ongoing, self.rng.random()))
        return best if self._room(best) else None

    def _fewest(self, among: list[int]) -> list[int]:
        least = min(len(self.view[r]) for r in among)
        return [r for r in among if len(self.view[r]) == least]

    def _choose(self, q: Req) -> int | None:
        n = self.s.replicas
        if self.policy == "round-robin":
            for k in range(n):
                r = (self.rr + k) % n
                if self._room(r):
                    self.rr = r + 1
                    return r
            return None
        if not q.tried:
            q.tried = True
            if self.policy == "pow2":
                first = list(range(n))
            else:
                holders = self.holders.get(q.adapter)
                first = list(holders) if holders else self._fewest(list(range(n)))
            chosen = self._two_choices(first)
            if chosen is not None:
                return chosen
        # Retries: Ray backs off and tries again (fewest-adapters replicas, then all); here
        # they are immediate and see only replicas with room.
        open_ = [r for r in range(n) if self._room(r)]
        if not open_:
            return None
        if self.policy == "affinity":
            open_ = self._fewest(open_)
        return self._two_choices(open_)

    def _route(self, q: Req, now: float) -> bool:
        r = self._choose(q)
        if r is None:
            return False
        q.replica, q.routed = r, now
        rep = self.reps[r]
        rep.ongoing += 1
        rep.pins[q.adapter] = rep.pins.get(q.adapter, 0) + 1
        self._place(r, q, now)
        self._kick(r, now)
        return True

    # -- a replica's adapters ----------------------------------------------------------------

    def _place(self, r: int, q: Req, now: float) -> None:
        """Queue `q` on replica r's engine, loading its adapter first if it is not held."""
        rep = self.reps[r]
        if q.adapter in rep.held:
            rep.held.move_to_end(q.adapter)
            rep.waiting.append(q)
            return
        if len(rep.held) >= self.s.slots:
            victim = next((a for a in rep.held if not rep.pins.get(a)), None)
            if victim is None:
                rep.blocked.append(q)  # every slot is needed by a request here: wait for one
                return
            del rep.held[victim]
            self._changed(r, victim, False, now)
        self._load(r, q, now)
        rep.waiting.append(q)

    def _load(self, r: int, q: Req, now: float) -> None:
        rep, f = self.reps[r], self.f
        self.loads += 1
        self.loads_measured += q.i >= self.measure_from
        rep.held[q.adapter] = INF
        self._changed(r, q.adapter, True, now)
        transfer = f.adapter_bytes / f.store_bandwidth_Bps
        fetch = max(now, rep.loader_free, self.store_free)
        self.store_free = fetch + transfer
        rep.loader_free = self.store_free + f.store_latency_s + f.cold_load_s
        self._push(rep.loader_free, LOADED, r, q.adapter)

    def _changed(self, r: int, adapter: int, added: bool, now: float) -> None:
        """Replica r's adapters changed: the router sees it `view_delay_s` later, and the
        controller broadcasts the routing table in the loop after."""
        self._push(now + self.f.view_delay_s, VIEW, r, (adapter, added))
        if self.window[0] <= now <= self.window[1]:
            self.change_loops.add(int(now / self.f.control_loop_s))

    # -- a replica's engine ------------------------------------------------------------------

    def _kick(self, r: int, now: float) -> None:
        if not self.reps[r].busy:
            self._start_step(r, now)

    def _start_step(self, r: int, now: float) -> None:
        rep, s, f = self.reps[r], self.s, self.f
        room, tokens, new, keep = s.max_batch - len(rep.running), 0, [], []
        for q in rep.waiting:
            fits = room > 0 and tokens + s.prompt_tokens <= s.max_batch_tokens
            if fits and rep.held.get(q.adapter, INF) <= now:
                new.append(q)
                room -= 1
                tokens += s.prompt_tokens
            else:
                keep.append(q)
        if not new and not rep.running:
            rep.busy = False
            return
        rep.waiting = keep
        rows = len(rep.running) + len(new)
        distinct = len({q.adapter for q in rep.running} | {q.adapter for q in new})
        dt = (
            f.step_base_s
            + f.step_per_row_s * rows
            + f.step_per_adapter_s * distinct
            + f.prefill_per_token_s * tokens
        )
        rep.busy = True
        self.steps += 1
        self.distinct_sum += distinct
        self.busy_s += dt
        self._push(now + dt, STEP, r, new)

    def _step_end(self, r: int, new: list[Req], now: float) -> int:
        """The step's tokens out; returns how many requests finished."""
        rep = self.reps[r]
        produced = len(rep.running) + len(new)
        if self.window[0] <= now <= self.window[1]:
            self.tokens_in_window += produced
        still, finished = [], []
        for q in rep.running:
            q.left -= 1
            (still if q.left > 0 else finished).append(q)
        for q in new:
            q.first, q.left = now, self.s.new_tokens - 1
            (still if q.left > 0 else finished).append(q)
        rep.running = still
        for q in finished:
            self._finish(r, q, now)
        while self.pending and self._route(self.pending[0], now):
            self.pending.popleft()
        rep.busy = False
        self._kick(r, now)
        return len(finished)

    def _finish(self, r: int, q: Req, now: float) -> None:
        rep = self.reps[r]
        q.done = now
        rep.ongoing -= 1
        rep.pins[q.adapter] -= 1
        if not rep.pins[q.adapter]:
            del rep.pins[q.adapter]
            for _ in range(len(rep.blocked)):  # a slot may be free now
                self._place(r, rep.blocked.popleft(), now)

    # -- the figures -------------------------------------------------------------------------

    def _figures(self, reqs: list[Req], area: float) -> dict:
        s, f = self.s, self.f
        measured = reqs[self.measure_from :]
        t0, t1 = self.window
        span = max(t1 - t0, 1e-9)
        ttft = [q.first - q.arrival + f.ingress_latency_s for q in measured]
        sojourn = [q.done - q.arrival for q in measured]
        router_wait = [q.routed - q.arrival for q in measured]
        arrival_rate = (len(measured) - 1) / span
        tokens_per_s = self.tokens_in_window / span
        loads_per_s = self.loads_measured / span
        ingress_msgs = arrival_rate + tokens_per_s  # a request, then one message per chunk
        ingresses = max(1, math.ceil(ingress_msgs / f.ingress_msgs_per_s))
        broadcast_bytes = s.replicas * (s.slots * f.model_id_bytes + f.replica_info_bytes)
        broadcasts_per_s = len(self.change_loops) / span
        controller_Bps = broadcasts_per_s * ingresses * broadcast_bytes
        held = [len(rep.held) for rep in self.reps]
        copies: dict[int, int] = {}
        for rep in self.reps:
            for a in rep.held:
                copies[a] = copies.get(a, 0) + 1
        return {
            "replicas": s.replicas,
            "requests_measured": len(measured),
            "window_s": span,
            "arrival_rate": arrival_rate,
            "tokens_per_s": tokens_per_s,
            "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99),
            "ttft_mean": sum(ttft) / len(ttft),
            "latency_p99": pct(sojourn, 99),
            "router_wait_share": sum(w > 1e-9 for w in router_wait) / len(measured),
            "adapter_loads": self.loads_measured,
            "loads_per_1000": 1000 * self.loads_measured / len(measured),
            "loads_per_s": loads_per_s,
            "distinct_adapters_per_step": self.distinct_sum / max(self.steps, 1),
            "replica_busy_share": self.busy_s / (s.replicas * max(q.done for q in reqs)),
            "adapters_held": sum(held),
            "copies_per_held_adapter": sum(copies.values()) / max(len(copies), 1),
            "store_Bps": loads_per_s * f.adapter_bytes,
            "store_utilisation": loads_per_s * f.adapter_bytes / f.store_bandwidth_Bps,
            "controller_broadcasts_per_s": broadcasts_per_s,
            "controller_Bps": controller_Bps,
            "controller_utilisation": controller_Bps / f.controller_Bps,
            "ingress_msgs_per_s": ingress_msgs,
            "ingresses_needed": ingresses,
            "littles_L": area / span,
            "littles_lambda_W": arrival_rate * sum(sojourn) / len(sojourn),
        }


def simulate(
    shape: Shape, figures: Figures, policy: str, arrivals, warmup: float = 0.2, seed: int = 0
) -> dict:
    """One policy over one fleet on `arrivals` (from `workload`); its figures."""
    return FleetSim(shape, figures, policy, seed).run(arrivals, warmup)


def capacity_rps(shape: Shape, figures: Figures, distinct: int) -> float:
    """Requests/s one replica finishes with a full batch of `distinct` adapters (modelled):
    each step decodes max_batch rows and prefills max_batch / new_tokens new ones on average."""
    f, b = figures, shape.max_batch
    step = (
        f.step_base_s
        + f.step_per_row_s * b
        + f.step_per_adapter_s * distinct
        + f.prefill_per_token_s * shape.prompt_tokens * b / shape.new_tokens
    )
    return b / (shape.new_tokens * step)


def controller_limit(shape: Shape, figures: Figures, tokens_per_s_per_replica: float) -> int:
    """Replicas at which the controller's routing broadcasts fill `controller_Bps`, when every
    control loop has a change to send and the ingresses grow with the load (each replica
    streaming `tokens_per_s_per_replica`): broadcasts/s x ingresses x replicas x (slots x id
    bytes + the rest of a replica's entry), which grows with the replicas squared."""
    f = figures
    per_replica = shape.slots * f.model_id_bytes + f.replica_info_bytes
    n = 1
    while n < 10**6:
        ingresses = max(1, math.ceil(n * tokens_per_s_per_replica / f.ingress_msgs_per_s))
        if ingresses * n * per_replica / f.control_loop_s > f.controller_Bps:
            return n - 1
        n += 1
    return n


def replicas_for_target(
    shape: Shape,
    figures: Figures,
    policy: str,
    arrivals,
    target_p99_s: float,
    warmup: float,
    max_replicas: int,
    seed: int = 0,
) -> dict:
    """The fewest replicas whose simulated TTFT p99 is within `target_p99_s` on `arrivals`
    (doubling from the capacity bound, then bisecting; p99 is taken to fall as replicas are
    added); `replicas` is None when even `max_replicas` misses it."""
    rate = len(arrivals) / arrivals[-1][0]
    tried: dict[int, float] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            out = simulate(
                Shape(**{**asdict(shape), "replicas": n}), figures, policy, arrivals, warmup, seed
            )
            tried[n] = out["ttft_p99"]
        return tried[n] <= target_p99_s

    low = max(1, math.floor(rate / capacity_rps(shape, figures, 1)))  # fewer cannot keep up
    bad, n = low - 1, low
    while not ok(n):
        if n >= max_replicas:
            return {"replicas": None, "tried": tried}
        bad, n = n, min(2 * n, max_replicas)
    while n - bad > 1:
        mid = (n + bad) // 2
        bad, n = (bad, mid) if ok(mid) else (mid, n)
    return {"replicas": n, "ttft_p99": tried[n], "tried": dict(sorted(tried.items()))}


def figure_labels(cfg: FleetConfig) -> dict[str, tuple[str, str]]:
    """FIGURES, with the figures `cfg` sets through --figure labelled as given."""
    given = {pair.partition("=")[0].strip() for pair in cfg.figures}
    return {
        name: ("given", "--figure on the command line") if name in given else label
        for name, label in FIGURES.items()
    }


COLUMNS = [
    "popularity",
    "policy",
    "replicas",
    "ttft_p50",
    "ttft_p99",
    "tokens_per_s",
    "loads_per_1000",
    "loads_per_s",
    "distinct_adapters_per_step",
    "router_wait_share",
    "store_utilisation",
    "ingresses_needed",
    "controller_utilisation",
]


def run(cfg: FleetConfig, json_out: str | Path | None = None) -> dict:
    """Every policy x popularity x replica count of `cfg` on the same arrivals per popularity,
    then (with find_replicas) the replicas each policy needs for the target TTFT p99; prints
    the tables and writes the JSON."""
    from lorafleet.bench import print_table
    from lorafleet.fsutil import atomic_write_json

    figures = cfg.model_figures()
    base = Shape(
        replicas=cfg.replicas[0],
        slots=cfg.slots,
        max_batch=cfg.max_batch,
        max_batch_tokens=cfg.max_batch_tokens,
        max_ongoing=cfg.max_ongoing,
        prompt_tokens=cfg.prompt_tokens,
        new_tokens=cfg.new_tokens,
    )
    cap_best = capacity_rps(base, figures, 1)
    cap_worst = capacity_rps(base, figures, cfg.max_batch)
    print(
        f"workload: {cfg.requests:,} requests at {cfg.rate:g}/s over {cfg.adapters:,} adapters, "
        f"{cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens; one replica finishes "
        f"{cap_worst:.2f}-{cap_best:.2f} requests/s at a full batch (modelled), so "
        f"{cfg.rate / cap_best:.0f}-{cfg.rate / cap_worst:.0f} replicas just keep up"
    )
    rows, needed = [], []
    for popularity in cfg.popularity:
        arrivals = workload(cfg.adapters, cfg.requests, cfg.rate, popularity, cfg.zipf_s, cfg.seed)
        for policy in cfg.policies:
            for n in cfg.replicas:
                shape = Shape(**{**asdict(base), "replicas": n})
                out = simulate(shape, figures, policy, arrivals, cfg.warmup, cfg.seed)
                rows.append({"popularity": popularity, "policy": policy, **out})
            if cfg.find_replicas:
                found = replicas_for_target(
                    base,
                    figures,
                    policy,
                    arrivals,
                    cfg.target_p99_s,
                    cfg.warmup,
                    cfg.max_replicas,
                    cfg.seed,
                )
                needed.append({"popularity": popularity, "policy": policy, **found})
    print_table(rows, COLUMNS)
    if needed:
        print(f"\nreplicas needed for TTFT p99 <= {cfg.target_p99_s:g} s:")
        print_table(needed, ["popularity", "policy", "replicas", "ttft_p99"])
    per_replica_tps = cap_worst * cfg.new_tokens  # a replica's tokens/s at a full batch
    limit = controller_limit(base, figures, per_replica_tps)
    print(
        f"\ncontroller: with every replica streaming {per_replica_tps:.0f} tok/s (a full batch, "
        f"modelled) and ingresses added as the load needs, its routing broadcasts fill the "
        f"assumed {figures.controller_Bps / 1e6:g} MB/s at ~{limit} replicas"
    )
    labels = figure_labels(cfg)
    print("figures (kind: where from):")
    for name, (kind, where) in labels.items():
        print(f"  {name} = {getattr(figures, name):g}  [{kind}] {where}")
    result = {
        "config": asdict(cfg),
        "figures": {
            n: {"value": getattr(figures, n), "kind": k, "source": w}
            for n, (k, w) in labels.items()
        },
        "capacity_rps_per_replica": {"one_adapter_per_batch": cap_best, "all_distinct": cap_worst},
        "controller_saturates_at_replicas": limit,
        "runs": rows,
        "replicas_needed": needed,
    }
    if json_out is not None:
        atomic_write_json(json_out, result)
        print(f"figures -> {json_out}")
    return result
