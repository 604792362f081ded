"""Shared by the generation routes: prompt checks, sampling parameters, waiting for a request
while watching for the client going away, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from pydantic import BaseModel

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.bridge import QueueFull, Stream
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.limits import Lease, Refused
from lorafleet.serve.api.recording import RequestRecord
from lorafleet.serve.api.state import ServerState
from lorafleet.serve.backend import REPLICA_FAILED, AdapterSpec
from lorafleet.serve.grammar import GrammarSpec
from lorafleet.serve.sequence import SamplingParams, TokenEvent, is_internal

DISCONNECT_POLL_S = 0.25


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(payload: BaseModel | dict | str) -> bytes:
    """One server-sent event: `data: <compact JSON or the string>` and a blank line."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n".encode()


def check_prompt(state: ServerState, ids: list[int]) -> None:
    backend = state.backend
    if not ids:
        raise APIError(400, "the prompt is empty", code="invalid_prompt", param="prompt")
    if min(ids) < 0 or max(ids) >= backend.vocab_size:
        raise APIError(
            400,
            f"prompt token ids must be in 0..{backend.vocab_size - 1}",
            code="invalid_prompt",
            param="prompt",
        )
    limit = min(backend.max_seq_len - 1, backend.max_batch_tokens)
    if len(ids) > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {backend.max_seq_len} "
            f"tokens; the prompt has {len(ids)} tokens (at most {limit} fit).",
            code="context_length_exceeded",
            param="prompt",
        )


def sampling(
    state: ServerState,
    n_prompt: int,
    *,
    max_tokens: int | None,
    default: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """SamplingParams for a request; a 400 when prompt + max_tokens exceed the context."""
    room = state.backend.max_seq_len - n_prompt
    if max_tokens is None:
        max_tokens = max(1, min(default, room))
    elif n_prompt + max_tokens > state.backend.max_seq_len:
        raise APIError(
            400,
            f"This model's maximum context length is {state.backend.max_seq_len} "
            f"tokens; the prompt ({n_prompt}) plus max_tokens ({max_tokens}) is "
            "more.",
            code="context_length_exceeded",
            param="max_tokens",
        )
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            top_k=top_k or 0,
            seed=seed,
            stop=tuple(s for s in stop if s),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
        )
    except LorafleetError as exc:
        raise APIError(400, str(exc), code="invalid_request") from None


def admit(
    state: ServerState, rec: RequestRecord, who: Principal, choices: list[tuple[int, int]]
) -> Lease:
    """Admit a request under its tenant's limits (serve/api/limits.py): `choices` are the
    (prompt tokens, max_tokens) of each engine request it makes. A 429 with Retry-After
    over a limit, a 400 when it needs more than a minute's tokens. The lease ends with the
    record (`rec.finish`); pass it to `submit`, which sends its tenant to the engine."""
    try:
        lease = state.limits.acquire(who.tenant, sum(p + m for p, m in choices))
    except Refused as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        raise APIError(exc.status, str(exc), code=exc.code, headers=headers) from None
    rec.on_finish(lease.release)
    return lease


async def submit(
    state: ServerState,
    ids: list[int],
    adapter: AdapterSpec,
    params: SamplingParams,
    lease: Lease | None = None,
) -> Stream:
    """Queue one engine request (for `lease`'s tenant, which tracks it); 503 while shutting
    down, 429 when the queue is full."""
    if state.closing:
        retry = {"Retry-After": str(state.config.retry_after_s)}
        raise APIError(503, "the server is shutting down", code="shutting_down", headers=retry)
    try:
        tenant = lease.tenant if lease is not None else None
        stream = await state.streams.submit(ids, adapter, params, tenant)
    except QueueFull:
        retry = {"Retry-After": str(state.config.retry_after_s)}
        raise APIError(
            429,
            f"too many requests queued ({state.config.max_waiting}); retry shortly",
            code="queue_full",
            headers=retry,
        ) from None
    if lease is not None:
        lease.track(stream, params.max_tokens, state.streams.live)
    return stream


def failure(stream: Stream) -> APIError:
    """The HTTP error for a request the engine failed: the caller's 400 (a bad adapter, a
    schema that admits no value), a 500 `internal_error` when the server failed it (its
    forward pass, the grammar engine: sequence.is_internal), a 503 with Retry-After when a
    drain cut it. One line, OpenAI's shape."""
    message = " ".join((stream.error or "the request failed").split())
    if stream.retry_after is not None:
        retry = {"Retry-After": str(stream.retry_after)}
        return APIError(503, message, code="draining", headers=retry)
    if message.startswith(REPLICA_FAILED):  # the replica serving it died (serve/ray)
        return APIError(503, message, code="replica_failed", headers={"Retry-After": "1"})
    if is_internal(message):
        return APIError(500, message, code="internal_error")
    return APIError(400, message, code="request_failed")


async def next_event(state: ServerState, request: Request, stream: Stream) -> TokenEvent | None:
    """The stream's next event, or None (and the request cancelled) if the client left."""
    task = asyncio.ensure_future(stream.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                state.streams.cancel(stream)
                task.cancel()
                return None
    except BaseException:
        task.cancel()
        state.streams.cancel(stream)
        raise


async def collect(state: ServerState, request: Request, stream: Stream) -> str | None:
    """The whole text of a request, or None if the client disconnected (request cancelled)."""
    parts = []
    while not stream.done:
        event = await next_event(state, request, stream)
        if event is None:
            return None
        parts.append(event.text)
    return "".join(parts)
