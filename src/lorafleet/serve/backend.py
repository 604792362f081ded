"""The serving-backend seam: what the HTTP layer, the registry and MoLE serving ask of an engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from lorafleet.adapters import Adapter
from lorafleet.serve.sequence import Mixture, SamplingParams, TokenEvent
from lorafleet.serve.slot_table import AdapterSource

# How the last event's `error` starts when the process serving the request died mid-way (a
# Ray replica, serve/ray): the HTTP layer answers it 503 (retryable), not the caller's 400.
REPLICA_FAILED = "replica failed"

# What a request runs on: None (the base model), an adapter's name, or a mixture (a Mixture,
# e.g. a MoLE's gated one, or (name, weight) pairs).
AdapterSpec = str | Mixture | Iterable[tuple[str, float]] | None


class ExclusiveLock(Protocol):
    """A re-entrant lock, as threading.RLock: `with` it, or acquire(blocking=False) / release."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, *exc: object) -> Any: ...


class ServingBackend(Protocol):
    """One base model serving many adapters to many requests at once.

    The in-process `Engine` (serve/engine.py) is one implementation; the HTTP package, the
    adapter registry (with its merged tier) and MoLE serving use nothing else of it, so a
    backend in another process or on another machine implements this and nothing more.

    Threads: `add_request`, `cancel`, `stats` and `adapter_in_use` never wait for a forward
    pass (an asyncio event loop calls them). Every residency change (`load_adapter`,
    `unload_adapter`) and the queue reads (`waiting_adapters`, `running_adapters`) are made
    under `exclusive()`, which no forward pass runs during."""

    tokenizer: Any  # the base model's transformers tokenizer (prompts in, text out)
    vocab_size: int  # prompt token ids must lie in 0..vocab_size - 1
    max_seq_len: int  # prompt + generated tokens of one request, at most
    max_batch_tokens: int  # prompt tokens one step takes: a longer prompt is refused
    eos_ids: tuple[int, ...]  # the ids that end generation by default
    max_slots: int  # adapters resident at once (0: the base model only)
    max_rank: int  # the highest adapter rank a slot takes
    base_fingerprint: str  # the base model's fingerprint (adapters.fingerprint)
    model_config: Any  # the base model's transformers config (what adapters are checked against)
    device: torch.device  # where the model runs (what a MoLE's gates move to)

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
        """Queue a request and return its id at once. `on_token` gets its events, on the
        backend's thread, in order: one per generated token, and a last one with
        finished=True (finish_reason "stop", "length", "cancelled" or "error" with `error`
        set; marked by sequence.internal_error when the backend failed, not the request). A
        bad mixture raises a one-line LorafleetError; a bad prompt or an adapter that
        cannot be served fails this request alone (its last event says why). Every adapter
        of the request stays resident while it runs. `tenant` names the client whose fair
        share of tokens the request counts against under contention (the API key's tenant;
        None: the adapter's, the base being one client); a backend may ignore it.
        `params.grammar` (serve/grammar.GrammarSpec, plain data) constrains the request's
        tokens to that JSON grammar, per request (SamplingParams says how it ends); a grammar
        the backend cannot serve fails this request alone."""
        ...

    def cancel(self, request_id: int) -> bool:
        """Stop a request (its last event comes with finish_reason "cancelled") and free
        what it holds; False when it is unknown or already finished."""
        ...

    def stats(self) -> dict:
        """A snapshot: at least "waiting" (requests queued, not yet running), "running",
        "kv_free_slots", "adapters_loaded", "adapter_slots", "steps", "generated_tokens" and
        "peak_running" (the most requests one forward pass ran)."""
        ...

    def start(self, threads: int | None = None) -> None:
        """Start working through requests in the background (until `stop`); `threads` is a
        hint for the compute threads of that work (None: the backend's own choice)."""
        ...

    def stop(self, grace_s: float = 10.0) -> None:
        """Let unfinished requests run for up to `grace_s` seconds, cancel the rest, and stop
        the background work `start` began. Blocking."""
        ...

    # -- adapter residency -------------------------------------------------------------------

    def attach_adapter_source(self, source: AdapterSource) -> None:
        """Make `source` the one place non-resident adapters come from: a request for one
        calls `source.prepare(name)` (at add time and at every step while it waits). A
        LorafleetError when another source is attached (detach it first)."""
        ...

    def detach_adapter_source(self, source: AdapterSource) -> None:
        """Forget `source` if it is the attached one (a no-op otherwise)."""
        ...

    def exclusive(self) -> ExclusiveLock:
        """The lock every forward pass and residency change holds: while it is held no
        request runs a step and no adapter comes or goes."""
        ...

    def adapter_ready(self, name: str | None) -> bool:
        """True for the base model (None) and for an adapter resident now."""
        ...

    def loaded_adapters(self) -> dict[str, int]:
        """Resident adapter name -> its slot (1..max_slots), a copy."""
        ...

    def load_adapter(self, name: str, adapter: Adapter, *, force: bool = False) -> int:
        """Make `adapter` resident as `name` in a free slot (or `name`'s own, replacing it when
        no running request uses it) and return the slot. Every check runs first: a one-line
        LorafleetError (another base's fingerprint unless `force`, no free slot, in use)."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Free `name`'s slot: a LorafleetError while a running request uses it or when it is
        not resident. Waiting requests for it wait again (the source reloads it)."""
        ...

    def adapter_in_use(self, name: str) -> int:
        """Running requests that use `name` (alone or in a mixture): exact under
        `exclusive()`, else a count of a moment ago. Never waits for a step."""
        ...

    def waiting_adapters(self) -> list[tuple[str, ...]]:
        """The adapters each waiting request needs, in queue order (first served first)."""
        ...

    def running_adapters(self) -> set[str]:
        """Every adapter a running request uses now."""
        ...

    def check_slots(self, adapter: Adapter) -> None:
        """Raise a one-line LorafleetError unless the slots can take `adapter` (its method
        is served, its rank fits, its target modules exist); copies nothing."""
        ...

    def slot_format(self) -> tuple[torch.device, torch.dtype] | None:
        """The device and dtype adapters take in a slot (None: no slots, or closed)."""
        ...
