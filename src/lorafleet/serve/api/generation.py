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
from lorafleet.serve.api.bridge import QueueFull, Stream
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.state import ServerState
from lorafleet.serve.backend import AdapterSpec
from lorafleet.serve.sequence import SamplingParams, TokenEvent

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
        )
    except LorafleetError as exc:
        raise APIError(400, str(exc), code="invalid_request") from None


async def submit(
    state: ServerState, ids: list[int], adapter: AdapterSpec, params: SamplingParams
) -> Stream:
    if state.closing:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    try:
        return await state.streams.submit(ids, adapter, params)
    except QueueFull:
        retry = {"Retry-After": str(state.config.retry_after_s)}
        raise APIError(
            429,
            f"too many requests queued ({state.config.max_waiting}); retry shortly",
            code="queue_full",
            headers=retry,
        ) from None


def failure(stream: Stream) -> APIError:
    """The HTTP error for a request the engine failed (a bad adapter is the caller's 400)."""
    message = stream.error or "the request failed"
    status = 500 if "forward pass failed" in message else 400
    return APIError(status, message, code="request_failed")


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
