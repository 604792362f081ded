"""The serving engine: requests for many adapters decoded together, joining and leaving per step."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from lorafleet.adapters import Adapter
from lorafleet.errors import LorafleetError
from lorafleet.layers import (
    MultiLoRAModel,
    check_quantize,
    check_quantize_device,
    inject_multilora,
    quantize_linears,
)
from lorafleet.models import Base, cast_parameters, parse_dtype
from lorafleet.serve.fair_share import AdmissionPolicy
from lorafleet.serve.grammar import GrammarCache, GrammarError
from lorafleet.serve.intake import Intake
from lorafleet.serve.prefix_cache import DEFAULT_BYTES, PrefixCache, adapter_digest
from lorafleet.serve.runners import runner_class
from lorafleet.serve.sampler import (
    advance,
    default_eos_ids,
    holdback,
    prompt_logprobs,
    sample,
    sampled_logprobs,
)
from lorafleet.serve.scheduler import Scheduler
from lorafleet.serve.sequence import (
    Mixture,
    RequestOutput,
    SamplingParams,
    Sequence,
    Status,
    TokenEvent,
    internal_error,
    prompt_problem,
    resolve_adapter,
)
from lorafleet.serve.slot_table import AdapterSource, SlotTable
from lorafleet.serve.stepper import StepThread

log = logging.getLogger(__name__)


class Engine:
    """One base model, up to `max_slots` resident LoRA adapters, continuous batching; the
    in-process `ServingBackend` (serve/backend.py).

    The base model is changed in place: its block linears become MultiLoRA layers (call
    `close()` to put them back). Each `step()` admits waiting requests (in the order of
    `schedule`: "fair", a fair share of tokens between clients, or "fcfs", first come first
    served; see serve/fair_share.py), within `max_batch_size` running sequences and
    `max_batch_tokens` prompt tokens, runs one forward
    that prefills them and decodes every running sequence, samples, and retires what finished.
    KV memory is preallocated for `max_batch_size` sequences of `max_seq_len` tokens
    (`stats()["kv_bytes"]`).

    Prefix caching (serve/prefix_cache.py): the K/V of every prefill's full 16-token blocks
    are kept, keyed by the request's adapter (name and content digest) and tokens, within
    `prefix_cache_bytes` (least recently used out; 0 = off); a later request under the same
    adapter that starts with the same blocks gets them copied into its slot and prefills only
    the rest (stats(): prefix_cache_hits / _misses / _hit_tokens / _bytes).

    Threads: a step holds one re-entrant lock for its whole forward. `add_request`, `cancel`
    and `stats` never wait for it, so an asyncio server may call them on its event loop while
    another thread steps: when no step runs they act at once; during a step a request or
    cancel goes into a thread-safe inbox that the next step drains first (so it joins that
    step's batch), and `stats` returns the snapshot taken at the end of the last step.
    `load_adapter` / `unload_adapter` take the lock (they change slots a forward reads): call
    them from a worker thread, not an event loop. `cancel` may be called from an `on_token`
    callback; never call `step()` from one. `start()` steps the engine on a daemon thread of
    its own (a server); offline callers call `step()` / `generate()` themselves instead.

    Precision: `dtype` (float32 / bfloat16; None = as loaded) casts the base's parameters in
    place, and the adapter slots and KV cache take it; `quantize` ("int8" / "int4") replaces
    the base's block linears by weight-only quantised ones (layers/quant.py; adapters stay in
    `dtype` beside them). Both stay after `close()`. `fuse` (default) computes each layer's
    q/k/v base products as one GEMM (layers/fused.py; the linears' weights become views of the
    fused one); fuse=False calls every projection alone (benchmarks).

    Device: the engine runs where the base's parameters are (load_base(device=...)): the KV
    cache, adapter slots, step inputs and RNGs are made there; only host-side bookkeeping
    (the slot map before each layer moves it, grammar bitmasks) is made on the CPU, on purpose
    and explicitly (tests/serve/test_engine_device.py). A quantised base must be on the CPU."""

    def __init__(
        self,
        base: Base,
        *,
        max_slots: int = 8,
        max_rank: int = 16,
        max_batch_size: int = 16,
        max_batch_tokens: int = 2048,
        max_seq_len: int | None = None,
        targets: list[str] | None = None,
        adapter_source: AdapterSource | None = None,
        seed: int | None = None,
        dtype: str | torch.dtype | None = None,
        quantize: str | None = None,
        fuse: bool = True,
        schedule: str | AdmissionPolicy = "fair",
        prefix_cache_bytes: int = DEFAULT_BYTES,
    ):
        model, config = base.model, base.model.config
        cls = runner_class(model)  # refuse before the model is touched
        dtype, quantize = dtype and parse_dtype(dtype), check_quantize(quantize)
        check_quantize_device(quantize, next(model.parameters()).device)
        max_pos = int(getattr(config, "max_position_embeddings", 2048))
        max_seq_len = min(2048, max_pos) if max_seq_len is None else max_seq_len
        for what, value, low in (
            ("max_slots", max_slots, 0),
            ("max_rank", max_rank, 1),
            ("max_batch_size", max_batch_size, 1),
            ("max_batch_tokens", max_batch_tokens, 1),
            ("max_seq_len", max_seq_len, 2),
            ("prefix_cache_bytes", prefix_cache_bytes, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LorafleetError(f"{what} must be an integer >= {low}, got {value!r}")
        if max_seq_len > max_pos:
            raise LorafleetError(f"max_seq_len {max_seq_len} is above the model's {max_pos}")
        self.base, self.tokenizer = base, base.tokenizer
        self.base_fingerprint, self.model_config = base.fingerprint, config
        self.max_slots, self.max_rank, self.max_seq_len = max_slots, max_rank, max_seq_len
        self.max_batch_tokens = max_batch_tokens
        if dtype is not None:
            cast_parameters(model, dtype)
        handle = inject_multilora(model, targets, max_slots, max_rank) if max_slots else None
        self.slots = SlotTable(handle, max_slots, base.fingerprint, adapter_source)
        self.quantization = quantize_linears(model, quantize)  # {"mode", "quantized", ...}
        context = handle.context if handle is not None else None
        self.runner = cls(model, context, max_batch_size, max_seq_len, fuse=fuse)
        self.packed_bytes = self.runner.pack_weights()  # kernels/packed.py: batched products
        self.kv = self.runner.kv
        reusable = self.runner.prefix_reusable  # else the cache stays off (0 blocks)
        self.prefix = PrefixCache(self.kv, prefix_cache_bytes if reusable else 0)
        self.scheduler = Scheduler(
            self.kv,
            self.slots,
            max_batch_size,
            max_batch_tokens,
            schedule,
            prefix=self.prefix if self.prefix.enabled else None,
        )
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_ids = default_eos_ids(model, self.tokenizer)
        # Structured output: grammars compiled for this tokenizer on first use, by spec.
        self.grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_ids)
        self.device = self.runner.device
        # Unseeded requests share the engine's generator (reproducible given the engine seed).
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._lock = threading.RLock()
        self.intake = Intake(self._lock, self._apply, self._refresh_snapshot)
        self._ids = itertools.count()
        self._requests: dict[int, Sequence] = {}  # every unfinished request
        self._finished: list[RequestOutput] = []  # finished since the last step() returned
        self.steps = 0
        self.generated_tokens = 0
        self.peak_running = 0  # the most sequences one forward has run (batching, observed)
        self._snapshot = self._take_snapshot()
        self._stepper: StepThread | None = None

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: list[int] | str,
        adapter: str | Mixture | Iterable[tuple[str, float]] | None = None,
        params: SamplingParams | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        *,
        tenant: str | None = None,
    ) -> int:
        """Queue a request (adapter None = the base; a name; or a mixture: a `Mixture` or
        (name, weight) pairs, all of them resident and pinned while it runs) and return its
        id; never waits for a step. `tenant` names whose fair share it counts against (None:
        its adapter's). A bad mixture raises (one line); a bad prompt or an unknown adapter
        fails only this request: it finishes with finish_reason "error"."""
        params = params if params is not None else SamplingParams()
        adapter, mixture = resolve_adapter(adapter)
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt]
        seq = Sequence(
            next(self._ids), ids, adapter, params, on_token, mixture=mixture, tenant=tenant
        )
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.intake.offer("add", seq)
        if self._stepper is not None:
            self._stepper.wake()
        return seq.request_id

    def cancel(self, request_id: int) -> bool:
        """Stop a request and free its KV memory: now, or at the start of the next step when
        one is running. False if the request is unknown or already done."""
        seq = self._requests.get(request_id)
        if not self.intake.holds_add(request_id) and (seq is None or seq.finished):
            return False
        self.intake.offer("cancel", request_id)
        return True

    def cancel_all(self) -> int:
        """Cancel every unfinished request (shutdown); returns how many."""
        with self._lock:
            self.intake.drain()
            ids = list(self._requests)
            for request_id in ids:
                self._cancel_now(request_id)
            self._refresh_snapshot()
            return len(ids)

    def step(self) -> list[RequestOutput]:
        """Admit, run one forward over the whole batch, sample, retire. Returns the requests
        that finished since the last call (including cancelled and failed ones)."""
        with self._lock:
            self.intake.drain()
            self._recheck_waiting()
            batch = self.scheduler.schedule()
            self._refresh_snapshot()  # what stats() shows during the forward
            if batch:
                self._run(batch.prefill, batch.decode)
            self._refresh_snapshot()
            finished, self._finished = self._finished, []
            return finished

    def generate(self, requests: Iterable) -> list[RequestOutput]:
        """Run `(prompt, adapter, params)` tuples (adapter and params optional) to completion;
        outputs in input order. For offline use: it consumes step()'s results."""
        ids = [self.add_request(*(r if isinstance(r, tuple) else (r,))) for r in requests]
        results: dict[int, RequestOutput] = {}
        while len(results) < len(ids):
            done = self.step()
            results.update((out.request_id, out) for out in done)
            if not done and not self.scheduler.running:
                time.sleep(0.001)  # only waiting on adapters a registry is loading
        return [results[i] for i in ids]

    def has_unfinished(self) -> bool:
        """Requests added and not finished (lock-free: requests in the inbox count)."""
        return bool(self.intake) or bool(self._requests)

    def start(self, threads: int | None = None) -> None:
        """Step on a daemon thread of the engine's own while requests are unfinished (a
        server); `threads`: torch's intra-op threads of that thread. A no-op when started."""
        if self._stepper is None:
            running = self._num_running
            self._stepper = StepThread(self.step, self.has_unfinished, running, threads)
            self._stepper.start()

    def stop(self, grace_s: float = 10.0) -> None:
        """Let unfinished requests run for up to `grace_s` seconds (stepped by the `start`
        thread), cancel the rest and end that thread; without `start`, cancel at once."""
        stepper, self._stepper = self._stepper, None
        if stepper is None:
            self.cancel_all()
        else:
            stepper.stop(grace_s, self.cancel_all)

    # -- adapters (the direct-slot API a registry builds on) ----------------------------------

    def attach_adapter_source(self, source: AdapterSource) -> None:
        """Make `source` where non-resident adapters come from; refused while another is."""
        with self._lock:
            if self.slots.source is not None and self.slots.source is not source:
                raise LorafleetError("this engine already has an adapter source; close it first")
            self.slots.source = source

    def detach_adapter_source(self, source: AdapterSource) -> None:
        with self._lock:
            if self.slots.source is source:
                self.slots.source = None

    @property
    def handle(self) -> MultiLoRAModel | None:
        """The MultiLoRA layers' handle (None with max_slots=0 or after close())."""
        return self.slots.handle

    def adapter_ready(self, name: str | None) -> bool:
        return self.slots.adapter_ready(name)

    def slot_of(self, name: str | None) -> int:
        return self.slots.slot_of(name)

    def adapter_in_use(self, name: str) -> int:
        """Running requests pinning `name`; it cannot be unloaded while this is > 0. Never
        waits for a step: exact under `exclusive()`, else the count of a moment ago."""
        return self.scheduler.in_use(name)

    def waiting_adapters(self) -> list[tuple[str, ...]]:
        """Each waiting request's adapters, in queue order."""
        with self._lock:
            return [seq.adapters for seq in self.scheduler.waiting]

    def running_adapters(self) -> set[str]:
        """Every adapter a running request uses."""
        with self._lock:
            return {name for seq in self.scheduler.running for name in seq.adapters}

    def loaded_adapters(self) -> dict[str, int]:
        return self.slots.names()

    def check_slots(self, adapter: Adapter) -> None:
        """Raise (one line) unless the slots take `adapter`; copies nothing."""
        self.slots.check_fits(adapter)

    def slot_format(self) -> tuple[torch.device, torch.dtype] | None:
        """The device and dtype of the adapter slots (None without slots or once closed)."""
        return self.slots.format()

    def load_adapter(self, name: str, adapter: Adapter, *, force: bool = False) -> int:
        """Copy a LoRA/rsLoRA adapter into a free slot (or its own, if `name` is resident and
        idle) and return the slot. Every check runs before anything is copied. Its content
        digest (outside the lock) keys its requests' prefix cache blocks."""
        self.slots.check(name, adapter, force=force)
        digest = adapter_digest(adapter) if self.prefix.enabled else ""
        with self._lock:
            if name in self.slots:
                self._refuse_in_use(name, "replaced")
            slot = self.slots.load(name, adapter)
            self.prefix.set_identity(name, digest)
            return slot

    def unload_adapter(self, name: str) -> None:
        """Free `name`'s slot; refused while a running request uses it. Waiting requests for
        it wait again (or fail, with no AdapterSource to reload it)."""
        with self._lock:
            if name in self.slots:
                self._refuse_in_use(name, "unloaded")
            self.slots.unload(name)
            self.prefix.forget(name)

    def stats(self) -> dict:
        """waiting, running, KV and adapter slot use, steps, tokens, peak_running. Never waits:
        between steps the figures are current, during a step they are those of its batch
        (requests that arrived meanwhile, in the inbox, count as waiting)."""
        if self._lock.acquire(blocking=False):
            try:
                self._refresh_snapshot()
            finally:
                self._lock.release()
        snapshot = dict(self._snapshot)
        snapshot["waiting"] += self.intake.pending_adds()
        return snapshot

    def clear_prefix_cache(self) -> None:
        """Drop every cached prompt block (e.g. a benchmark's cold start); takes the lock."""
        with self._lock:
            self.prefix.clear()

    def _num_running(self) -> int:
        return len(self.scheduler.running)  # lock-free: the stepping thread reads it per step

    def _refresh_snapshot(self) -> None:
        self._snapshot = self._take_snapshot()

    def _take_snapshot(self) -> dict:
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_free_slots": self.kv.free_slots,
            "kv_used_slots": self.kv.used_slots,
            "kv_bytes": self.kv.bytes,
            "packed_weight_bytes": self.packed_bytes,  # oneDNN copies of the base weights
            "adapters_loaded": len(self.slots),
            "adapter_slots": self.max_slots,
            # resident adapters pinned by a running request (0 when idle: none leaked)
            "adapters_in_use": len({n for s in self.scheduler.running for n in s.adapters}),
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "peak_running": self.peak_running,
            **self.prefix.stats(),
        }

    def close(self) -> None:
        """Fail what is unfinished and give the base model its plain linears back."""
        with self._lock:
            for seq in list(self._requests.values()):
                self._fail(seq, "the engine was closed")
            self.slots.close()

    # -- internals --------------------------------------------------------------------------

    def _apply(self, kind: str, item: Sequence | int) -> None:
        """A request or cancel from the intake (lock held)."""
        if kind == "add":
            self._admit(item)
        else:
            self._cancel_now(item)

    def _admit(self, seq: Sequence) -> None:
        self._requests[seq.request_id] = seq
        ids = seq.prompt_ids
        problem = prompt_problem(
            ids, self.vocab_size, self.max_seq_len, self.max_batch_tokens
        ) or self.slots.problem_with(seq.adapters)
        if problem:
            self._fail(seq, problem)
        else:
            self.scheduler.add(seq)

    def _cancel_now(self, request_id: int) -> None:
        seq = self._requests.get(request_id)
        if seq is not None and not seq.finished:
            self._finish(seq, "cancelled")

    def _refuse_in_use(self, name: str, what: str) -> None:
        users = self.scheduler.in_use(name)
        if users:
            raise LorafleetError(
                f"adapter {name} is in use by {users} running request(s) and cannot be {what} now"
            )

    def _recheck_waiting(self) -> None:
        """Fail waiting requests whose adapters can no longer be served (asked once per name)."""
        verdicts: dict[str, str | None] = {}
        for seq in list(self.scheduler.waiting):
            for name in seq.adapters:
                if name not in verdicts and not self.adapter_ready(name):
                    verdicts[name] = self.slots.problem(name)
                if verdicts.get(name):
                    self._fail(seq, verdicts[name])
                    break
        # After every load above: a mixture whose resident part is served per row only.
        for seq in list(self.scheduler.waiting):
            if seq.mixture is not None and (problem := self.slots.unmixable(seq.adapters)):
                self._fail(seq, problem)

    def _run(self, prefill: list[Sequence], decode: list[Sequence]) -> None:
        prefill = [seq for seq in prefill if self._start_grammar(seq)]
        seqs = prefill + decode
        if not seqs:
            return
        try:
            logits = self.runner.run(prefill, decode)  # [B, vocab]
        except Exception as exc:  # a failed forward fails its batch, never the engine
            log.exception("engine forward failed")
            self._fail_all(seqs, "the forward pass failed", exc)
            return
        for seq in prefill:  # their slots hold their prefill's K/V now: keep its full blocks
            self.prefix.store(seq)
            seq.prefix_hit = 0
        logits, extra = logits[: len(seqs)], logits[len(seqs) :]  # extra: prompt positions
        broken: dict[int, str] = {}  # rows whose grammar engine failed: they alone fail
        try:
            tokens = sample(logits, seqs, self.generator, broken)
            logprobs = sampled_logprobs(logits, seqs, tokens)
            self._prompt_logprobs(prefill, extra)
        except Exception as exc:  # a sampling bug fails its batch, never every later step
            log.exception("engine sampling failed")
            self._fail_all(seqs, "sampling failed", exc)
            return
        self.steps += 1
        self.peak_running = max(self.peak_running, len(seqs))
        for i, (seq, token, logprob) in enumerate(zip(seqs, tokens, logprobs, strict=True)):
            if i in broken:
                log.error("request %s: structured output failed: %s", seq.request_id, broken[i])
                self._fail(seq, internal_error(f"structured output failed: {broken[i]}"))
            elif not seq.finished:  # an on_token callback may have cancelled it meanwhile
                seq.num_cached = seq.num_tokens  # the prompt, or one more token, is now cached
                self._append(seq, token, logprob)

    def _fail_all(self, seqs: list[Sequence], what: str, exc: Exception) -> None:
        """Fail a batch the server could not run (an internal error: HTTP 500)."""
        for seq in seqs:
            self._fail(seq, internal_error(f"{what}: {type(exc).__name__}: {exc}"))

    def _start_grammar(self, seq: Sequence) -> bool:
        """Give a sequence whose params ask for a grammar its matcher (compiled on the engine's
        thread, cached by spec); False after failing it when its grammar cannot be served."""
        if seq.params.grammar is None or seq.grammar is not None:
            return True
        try:
            seq.grammar = self.grammars.matcher(seq.params.grammar)
        except LorafleetError as exc:
            self._fail(seq, str(exc))
            return False
        except Exception as exc:  # the grammar engine's own failure (e.g. on this tokenizer)
            log.exception("structured output setup failed")  # fails this row, not every step
            message = f"structured output failed: {type(exc).__name__}: {exc}"
            self._fail(seq, internal_error(message))
            return False
        return True

    def _prompt_logprobs(self, prefill: list[Sequence], logits: torch.Tensor) -> None:
        """Give each prefill sequence that asks its prompt logprobs, from the runner's extra
        rows (its first n - 1 prompt positions, in prefill order)."""
        row = 0
        for seq in prefill:
            k = seq.params.prompt_logprobs
            if k is not None and not seq.generated:  # a resumed one (preempted) has them
                n = len(seq.prompt_ids) - 1
                seq.prompt_logprobs = prompt_logprobs(logits[row : row + n], seq.prompt_ids, k)
                row += n

    def _append(self, seq: Sequence, token: int, logprob=None) -> None:
        if logprob is not None:
            seq.logprobs = seq.logprobs if seq.logprobs is not None else []
            seq.logprobs.append(logprob)
        try:
            reason = advance(seq, token, self.eos_ids, self._decode, self.max_seq_len)
        except GrammarError as exc:  # its grammar refused the token: this row alone fails
            self._fail(seq, str(exc))
            return
        except Exception as exc:  # the grammar engine's (or tokenizer's) own failure: this row
            log.exception("request %s: taking its token failed", seq.request_id)
            self._fail(seq, internal_error(f"taking a token failed: {type(exc).__name__}: {exc}"))
            return
        self.generated_tokens += 1
        if reason is not None:
            self._finish(seq, reason, token)
        else:
            self._emit(seq, token)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, seq: Sequence, token: int | None) -> None:
        end = len(seq.text) if seq.finished else len(seq.text) - holdback(seq.text, seq.params.stop)
        delta = seq.text[seq.emitted : end] if end > seq.emitted else ""
        seq.emitted = max(seq.emitted, end)
        if seq.on_token is None:
            return
        logprob = seq.logprobs[-1] if token is not None and seq.logprobs else None
        prompt = tuple(seq.prompt_logprobs) if seq.events == 0 and seq.prompt_logprobs else None
        seq.events += 1
        event = TokenEvent(
            seq.request_id,
            token,
            delta,
            seq.finished,
            seq.finish_reason,
            seq.error,
            logprob,
            prompt,
        )
        try:
            seq.on_token(event)
        except Exception as exc:  # a broken callback fails its own request only
            log.exception("on_token callback of request %s failed", seq.request_id)
            if not seq.finished:
                message = f"on_token callback failed: {type(exc).__name__}: {exc}"
                self._fail(seq, internal_error(message))

    def _finish(
        self, seq: Sequence, reason: str, token: int | None = None, error: str | None = None
    ) -> None:
        """Retire a sequence: free its KV slot and adapter pin, send the final event."""
        self.scheduler.remove(seq)
        seq.finish_reason, seq.error = reason, error
        self._requests.pop(seq.request_id, None)
        self._finished.append(seq.output())
        self._emit(seq, token)

    def _fail(self, seq: Sequence, message: str) -> None:
        if seq.status is not Status.FINISHED:
            self._finish(seq, "error", error=" ".join(str(message).split()))

    def exclusive(self):
        """A context manager that holds the engine between steps: no forward runs and no slot
        changes while it is held (e.g. while a copy of the model is taken)."""
        return self._lock

    # -- measurements (benchmarks) ----------------------------------------------------------

    def forward(self, prefill: list[Sequence], decode: list[Sequence]) -> torch.Tensor:
        """One forward pass over sequences the caller placed (KV slots from `self.kv`, adapter
        slots set), without sampling or bookkeeping: logits [len(prefill) + len(decode),
        vocab], for teacher-forced comparisons."""
        with self._lock:
            return self.runner.run(prefill, decode)

    def forward_parts(self) -> dict[str, list[tuple[object, str]]]:
        """Where a forward pass's parts are, for a profiler to wrap (owner, method name):
        "attention", "kv_write" (the runner's), "base_matmul" (the fused q/k/v GEMMs). A
        runner's `attend_decode` (the decode-layer kernel: RoPE, KV write and attention in one
        call) counts as attention."""
        attention = [(self.runner, "attend")]
        if hasattr(self.runner, "attend_decode"):
            attention.append((self.runner, "attend_decode"))
        return {
            "attention": attention,
            "kv_write": [(self.runner, "write_kv")],
            "base_matmul": [(fused, "base") for fused in self.runner.qkv if fused.fused],
        }
