"""The Ray Serve replica: one lorafleet engine and adapter registry over the shared adapter
directory, serving requests by streaming their token events, with Ray Serve's model
multiplexing keyed by adapter; and the board where replicas post their stats."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray import serve

from lorafleet.errors import LorafleetError
from lorafleet.serve.backend import AdapterSpec
from lorafleet.serve.placement import replica_device
from lorafleet.serve.ray.wire import REGISTRY_COUNTERS, FleetSpec, MoleRef, RayRequest
from lorafleet.serve.sequence import Mixture, TokenEvent

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5  # how often a replica posts its stats to the board
# A replica posted within this long is alive (a killed one's row ages out).
ALIVE_S = 3.0


@ray.remote(num_cpus=0)
class Board:
    """The live replicas' latest stats, posted by each replica every REPORT_EVERY_S and read
    by the ingress: what /metrics sums and what the fault test finds a replica's PID by."""

    def __init__(self):
        self.rows: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, row: dict) -> None:
        self.rows[replica] = (time.time(), row)

    def live(self, max_age_s: float = ALIVE_S) -> list[dict]:
        now = time.time()
        self.rows = {k: v for k, v in self.rows.items() if now - v[0] <= 10 * max_age_s}
        return [row for at, row in self.rows.values() if now - at <= max_age_s]


@dataclass
class ReplicaExtras:
    """What a replica serves beside plain adapters, injected as `lorafleet serve` injects it
    into build_state (the factories cross to the replicas by reference: module-level names):
    `moles` (compose.mole_serve.MoleCatalog) serves MoLE dirs, `classifier`
    (bayes.serving.laplace_classifier) answers class_choices, `hub_adapters` lets the
    registry take hub ids `org/name[@rev]` (their paths come from the ingress, which fetched
    them). Merges and image edits are the ingress's (serve.ray.ingress)."""

    moles: Callable | None = None
    classifier: Callable | None = None
    hub_adapters: bool = False


class ReplicaCore:
    """An engine + registry built from a FleetSpec (what `lorafleet serve` builds, without the
    HTTP app; with `extras`' MoLEs and classifier), its adapter bookkeeping and stats. No Ray
    here but the board it posts to."""

    def __init__(
        self,
        spec: FleetSpec,
        board,
        replica_id: str,
        node: str = "",
        extras: ReplicaExtras | None = None,
    ):
        from lorafleet.models import load_base
        from lorafleet.serve.api import precision
        from lorafleet.serve.api.config import ServerConfig
        from lorafleet.serve.api.server import build_state

        self.replica_id, self.pid = replica_id, os.getpid()
        self.node = node  # the IP of the Ray node it runs on: where each replica went
        # The device Ray's placement implies (auto without a GPU granted: the CPU), and the
        # precision `auto` picks for this node's CPU.
        device = replica_device(spec.resources)
        dtype, spec.settings.quantize = precision.resolve(
            spec.dtype, spec.settings.quantize, device
        )
        loaded = load_base(spec.base, dtype=dtype, device=device)
        extras = extras or ReplicaExtras()
        config = ServerConfig(model_name=spec.model_name, hub_adapters=extras.hub_adapters)
        # No merge function: the ingress merges once and sends the merge's directory.
        state = build_state(
            loaded,
            spec.adapters_dir,
            None,
            spec.settings,
            config,
            classifier=extras.classifier,
            moles=extras.moles,
        )
        self.engine, self.registry = state.backend, state.registry
        self.moles, self.classifier = state.moles, state.classifier
        self.engine.start(spec.threads)
        self.routed_loads = 0  # adapters Ray's multiplexing asked this replica to take
        self.requests = 0
        self._board, self._stop = board, threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, daemon=True)
        self._reporter.start()

    def describe(self) -> dict:
        """What the ingress's RayBackend mirrors (ServingBackend's attributes)."""
        e = self.engine
        return {
            "tokenizer": e.tokenizer,
            "vocab_size": e.vocab_size,
            "max_seq_len": e.max_seq_len,
            "max_batch_tokens": e.max_batch_tokens,
            "eos_ids": tuple(e.eos_ids),
            "max_slots": e.max_slots,
            "max_rank": e.max_rank,
            "base_fingerprint": e.base_fingerprint,
            "model_config": e.model_config,
        }

    def take(self, name: str) -> None:
        """Ray's multiplexing routed adapter `name` here for the first time (or again after
        evicting it): look at its directory entry afresh (it may have been uploaded since this
        replica scanned); the request then loads it through the registry as any other."""
        self.routed_loads += 1
        self.registry.refresh(name)

    def learn_paths(self, paths: dict[str, str]) -> None:
        """Know each adapter where the ingress reads it (added through admin under another
        name than its directory's); one registered elsewhere is re-pointed when unused."""
        for name, path in paths.items():
            known = self.registry.path_of(name)
            if known is not None and str(known) == path:
                continue
            try:
                if known is not None:
                    self.registry.remove(name)
                self.registry.add(name, path)
            except LorafleetError as exc:  # its request fails with the registry's reason
                log.warning("adapter %s at %s: %s", name, path, exc)

    def engine_spec(self, adapter: AdapterSpec) -> AdapterSpec:
        """What this engine runs for a request's spec: a MoLE sent by reference (a Mixture
        whose gate is a MoleRef) becomes this replica's own MoLE spec (its gates, on its
        device), re-checked first if its files changed; anything else as it is. A one-line
        LorafleetError when this replica cannot serve the MoLE."""
        if not (isinstance(adapter, Mixture) and isinstance(adapter.gate, MoleRef)):
            return adapter
        ref = adapter.gate
        self.registry.refresh(ref.name)
        if self.moles is None or ref.name not in self.moles:
            reason = self.registry.reason(ref.name) or "not a MoLE in the adapters directory"
            raise LorafleetError(f"MoLE {ref.name}: {reason}")
        return self.moles.spec(ref.name, ref.mask)

    def classify(
        self, adapter: str, prompt: str, choices: list[str], paths: dict[str, str]
    ) -> dict:
        """The classifier's answer (class_choices) for `adapter`, or {"error": one line}."""
        if self.classifier is None:
            return {"error": "class_choices is not served by this fleet's replicas"}
        self.learn_paths(paths)
        try:
            problem = self.classifier.problem(adapter)
            if problem:
                return {"error": problem}
            return self.classifier.probs(adapter, prompt, choices)
        except LorafleetError as exc:
            return {"error": str(exc)}

    def report(self) -> dict:
        reg = self.registry.stats()
        return {
            **self.engine.stats(),
            "replica": self.replica_id,
            "pid": self.pid,
            "node": self.node,
            "requests": self.requests,
            "routed_loads": self.routed_loads,
            # adapters put in a slot (from CPU memory or from disk): the routing's cost
            "adapter_loads": int(reg.get("cpu_hits", 0)) + int(reg.get("misses", 0)),
            "disk_loads": int(reg.get("loads", 0)),
            "resident": sorted(self.engine.loaded_adapters()),
            "registry": {key: int(reg.get(key, 0)) for key in REGISTRY_COUNTERS},
        }

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                self._board.put.remote(self.replica_id, self.report())
            except Exception as exc:  # the board gone (shutting down): stop posting
                log.info("stats board unreachable: %s", exc)
                return

    def healthy(self) -> bool:
        return self._reporter.is_alive()

    def close(self) -> None:
        if self._stop.is_set():  # closed already (Ray's shutdown, then the collector)
            return
        self._stop.set()
        self.engine.stop(grace_s=1.0)
        self.registry.close()


def replica_deployment(spec: FleetSpec):
    """The Ray Serve deployment of `spec.replicas` replicas, each a ReplicaCore; the
    multiplexed loader keeps up to the engine's slot count (max_adapters) adapters per
    replica in Ray's routing table. Defined per fleet: max_num_models_per_replica is set
    where the class is made."""
    slots = max(1, spec.settings.max_adapters)
    options = spec.resources or {"num_cpus": spec.threads}

    @serve.deployment(
        name="lorafleet-replica",
        num_replicas=spec.replicas,
        # One batch per replica: Ray's multiplexed router sends a request away from the replicas
        # holding its adapter only when they are at max_ongoing_requests, so a deeper bound lets
        # a hot adapter queue behind a full batch (docs/scaling.md: affinity's p99 TTFT 49.7 s at
        # 4x the batch, 0.86 s at 1x, in the simulator) instead of spreading to another replica.
        max_ongoing_requests=spec.settings.max_batch_size,
        ray_actor_options=options,
        health_check_period_s=1.0,
        graceful_shutdown_timeout_s=2.0,
        **spec.spread.ray_options(),
    )
    class LorafleetReplica:
        def __init__(self, spec: FleetSpec, board, extras: ReplicaExtras | None = None):
            context = serve.get_replica_context()
            node = ray.util.get_node_ip_address()
            self.core = ReplicaCore(spec, board, context.replica_id.unique_id, node, extras)

        @serve.multiplexed(max_num_models_per_replica=slots)
        async def routed(self, name: str) -> str:
            # Ray forgets it LRU past `slots`; the registry frees slots by its own LRU.
            await asyncio.to_thread(self.core.take, name)  # file checks: off the event loop
            return name

        async def generate(self, request: RayRequest):
            """The request's TokenEvents as they come (ids are this replica's own)."""
            core = self.core
            core.requests += 1
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.routed(model_id)
            if request.paths:
                await asyncio.to_thread(core.learn_paths, request.paths)
            adapter = request.adapter
            if isinstance(adapter, Mixture) and isinstance(adapter.gate, MoleRef):
                try:  # may re-check the MoLE's files: off the event loop
                    adapter = await asyncio.to_thread(core.engine_spec, adapter)
                except LorafleetError as exc:
                    yield TokenEvent(-1, None, "", True, "error", str(exc))
                    return
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def on_token(event: TokenEvent) -> None:  # the engine's thread
                loop.call_soon_threadsafe(queue.put_nowait, event)

            try:
                rid = core.engine.add_request(
                    request.prompt, adapter, request.params, on_token, tenant=request.tenant
                )
            except LorafleetError as exc:
                yield TokenEvent(-1, None, "", True, "error", str(exc))
                return
            finished = False
            try:
                while not finished:
                    event = await queue.get()
                    finished = event.finished
                    yield event
            finally:  # the client went away (Ray cancels this generator): free its row
                if not finished:
                    core.engine.cancel(rid)

        async def classify(
            self, adapter: str, prompt: str, choices: list[str], paths: dict[str, str]
        ) -> dict:
            """class_choices' answer (ReplicaCore.classify), on a thread of its own."""
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.routed(model_id)
            return await asyncio.to_thread(self.core.classify, adapter, prompt, choices, paths)

        def describe(self) -> dict:
            return self.core.describe()

        def report(self) -> dict:
            return self.core.report()

        def check_health(self) -> None:
            if not self.core.healthy():
                raise RuntimeError("the replica's reporter thread died")

        def __del__(self):
            core = getattr(self, "core", None)  # None: __init__ failed
            if core is not None:
                core.close()

    return LorafleetReplica
