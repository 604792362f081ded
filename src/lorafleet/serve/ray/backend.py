"""RayBackend: the ServingBackend the ingress's HTTP app runs over, forwarding each request
to a replica of the Ray Serve deployment (routed by adapter) and streaming its tokens back."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from lorafleet.errors import LorafleetError
from lorafleet.serve.backend import REPLICA_FAILED, AdapterSpec
from lorafleet.serve.ray.wire import RayRequest, route_id, sum_stats
from lorafleet.serve.sequence import SamplingParams, TokenEvent, resolve_adapter

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often the fleet's stats are read from the board


def failure_text(exc: BaseException) -> str:
    """One line naming a replica failure (Ray's errors span many lines)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{REPLICA_FAILED}: {type(exc).__name__}: {first}".rstrip(": ")


class _Flight:
    """One request in flight at the ingress: its Ray response stream, once open."""

    def __init__(self):
        self.response = None
        self.cancelled = False


class RayBackend:
    """A ServingBackend whose engine is a Ray Serve deployment of lorafleet replicas.

    `add_request` returns at once; a worker thread sends the request through `handle`
    (with `multiplexed_model_id` = wire.route_id(adapter) when `routing` is "affinity", none
    for "round_robin", Ray's adapter-blind balancing) and passes each TokenEvent on under this
    backend's request id. A replica that dies before the request's first token: the request
    is sent again (`retries` times; Ray routes it to a live replica); after: its last event
    is finish_reason "error" naming the replica failure. Residency is each replica's own (its
    registry over the shared directory): here nothing is resident, `load_adapter` refuses,
    and `place(spec)` (set by the fleet: ingress.SharedAdapters.place) gives, on the worker
    thread before the request is sent, the spec to send (a merge: the adapter it was written
    to in the shared directory) and the directories of its adapters that replicas cannot find
    by name there (added through admin from another folder, hub adapters), sent along; a
    LorafleetError from it ends the request with that error.
    `stats()` is the sum over live replicas (wire.sum_stats) of the rows `read_rows()` returns
    (one per live replica: the fleet reads its board), read every POLL_S seconds by a thread
    of its own, so it never waits. `handle` is the deployment's Ray Serve handle (or anything
    with its `options(...).generate.remote(request)` streaming shape)."""

    def __init__(
        self,
        handle,
        read_rows: Callable[[], list[dict]],
        info: dict,
        routing: str = "affinity",
        retries: int = 3,
    ):
        self.handle, self.read_rows = handle, read_rows
        self.routing, self.retries = routing, retries
        self.tokenizer = info["tokenizer"]
        self.vocab_size = int(info["vocab_size"])
        self.max_seq_len = int(info["max_seq_len"])
        self.max_batch_tokens = int(info["max_batch_tokens"])
        self.eos_ids = tuple(info["eos_ids"])
        self.max_slots = int(info["max_slots"])
        self.max_rank = int(info["max_rank"])
        self.base_fingerprint = info["base_fingerprint"]
        self.model_config = info["model_config"]
        self.device = torch.device("cpu")  # the ingress runs no model
        self.place: Callable[[AdapterSpec], tuple[AdapterSpec, dict[str, str]]] = _as_is
        self._ids = itertools.count()
        self._flights: dict[int, _Flight] = {}
        self._pool = ThreadPoolExecutor(1024, thread_name_prefix="lorafleet-ray")
        self._lock = threading.RLock()
        self._source = None
        self._stats = sum_stats([])
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.refresh_stats()

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: list[int] | str,
        adapter: AdapterSpec = None,
        params: SamplingParams | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        *,
        tenant: str | None = None,
    ) -> int:
        label, mixture = resolve_adapter(adapter)  # a bad mixture: its one-line error, now
        spec = mixture if mixture is not None else label  # plain data: it crosses processes
        request = RayRequest(prompt, spec, params or SamplingParams(), tenant)
        request_id = next(self._ids)
        self._flights[request_id] = flight = _Flight()
        self._pool.submit(self._run, request_id, flight, request, on_token or _drop)
        return request_id

    def _run(self, request_id, flight, request, on_token) -> None:
        try:
            try:  # may write a merge or fetch a hub adapter: here, off the caller's thread
                request.adapter, request.paths = self.place(request.adapter)
            except LorafleetError as exc:
                last = TokenEvent(request_id, None, "", True, "error", str(exc))
            else:
                model_id = route_id(request.adapter) if self.routing == "affinity" else ""
                last = self._relay(request_id, flight, request, model_id, on_token)
        except Exception as exc:  # never leave a client without its last event
            log.exception("request %d failed at the ingress", request_id)
            last = TokenEvent(request_id, None, "", True, "error", failure_text(exc))
        finally:
            self._flights.pop(request_id, None)
        if last is not None:
            on_token(last)

    def _relay(self, request_id, flight, request, model_id, on_token) -> TokenEvent | None:
        """Stream the request's events to `on_token`; the last event to send, if not sent."""
        tries = 0
        while True:
            sent = 0
            try:
                handle = self.handle.options(stream=True, multiplexed_model_id=model_id)
                flight.response = handle.generate.remote(request)
                if flight.cancelled:
                    flight.response.cancel()
                for event in flight.response:
                    if flight.cancelled:
                        break
                    on_token(replace(event, request_id=request_id))
                    sent += 1
                    if event.finished:
                        return None
                if flight.cancelled:
                    return TokenEvent(request_id, None, "", True, "cancelled")
                raise LorafleetError("the replica ended the stream without a last event")
            except Exception as exc:
                if flight.cancelled:
                    return TokenEvent(request_id, None, "", True, "cancelled")
                if sent == 0 and tries < self.retries:
                    tries += 1
                    log.warning("request %d: %s; sending it again", request_id, failure_text(exc))
                    time.sleep(0.5 * tries)  # time for Ray to see the replica gone
                    continue
                return TokenEvent(request_id, None, "", True, "error", failure_text(exc))

    def cancel(self, request_id: int) -> bool:
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        flight.cancelled = True
        if flight.response is not None:
            flight.response.cancel()
        return True

    def stats(self) -> dict:
        return self._stats

    def replica_stats(self) -> list[dict]:
        """One row per live replica (its engine stats, pid, adapter_loads, resident, ...)."""
        return list(self._stats["replicas"])

    def refresh_stats(self) -> None:
        """Read the board now (what the poller does every POLL_S seconds)."""
        rows = self.read_rows()
        self._stats = sum_stats(sorted(rows, key=lambda row: row["replica"]))

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.refresh_stats()
            except Exception as exc:
                log.warning("reading the replicas' stats failed: %s", exc)

    def start(self, threads: int | None = None) -> None:
        if self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll, name="lorafleet-ray-stats")
            self._poller.daemon = True
            self._poller.start()

    def stop(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        while self._flights and time.monotonic() < deadline:
            time.sleep(0.05)
        for request_id in list(self._flights):
            self.cancel(request_id)
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    # -- adapter residency: each replica's own ----------------------------------------------

    def attach_adapter_source(self, source) -> None:
        if self._source is not None and self._source is not source:
            raise LorafleetError("this backend already has an adapter source")
        self._source = source

    def detach_adapter_source(self, source) -> None:
        if self._source is source:
            self._source = None

    def exclusive(self):
        return self._lock

    def adapter_ready(self, name: str | None) -> bool:
        return name is None

    def loaded_adapters(self) -> dict[str, int]:
        return {}

    def load_adapter(self, name: str, adapter, *, force: bool = False) -> int:
        raise LorafleetError(
            "on Ray, adapters are loaded by each replica from the shared directory"
        )

    def unload_adapter(self, name: str) -> None:
        raise LorafleetError(f"adapter {name} is not resident at the Ray ingress")

    def adapter_in_use(self, name: str) -> int:
        return 0

    def waiting_adapters(self) -> list[tuple[str, ...]]:
        return []

    def running_adapters(self) -> set[str]:
        return set()

    def check_slots(self, adapter) -> None:
        """Nothing here: each replica checks an adapter against its slots as it loads it (a
        bad one fails its requests with the reason)."""

    def slot_format(self):
        return None


def _as_is(spec: AdapterSpec) -> tuple[AdapterSpec, dict[str, str]]:
    """A `place` for a fleet without anything to place: the spec as it is, no paths."""
    return spec, {}


def _drop(event: TokenEvent) -> None:
    """An on_token for requests nobody listens to."""
