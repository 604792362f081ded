"""Several choices per OpenAI request (`n`, batched prompts), each its own engine request, and
their log-probabilities in OpenAI's legacy-completions and chat shapes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from lorafleet.serve.api import generation as gen
from lorafleet.serve.api.bridge import Stream
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.limits import Lease
from lorafleet.serve.api.recording import CLIENT_CLOSED, RequestRecord
from lorafleet.serve.api.responses import ChatLogprobs, CompletionLogprobs, TokenLogprobOut, Usage
from lorafleet.serve.sequence import SamplingParams, TokenEvent, TokenLogprob


@dataclass
class Choice:
    """One answer being generated: its index in `choices`, prompt, stream and what arrived."""

    index: int
    prompt_ids: list[int]
    stream: Stream
    events: list[TokenEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [e.logprob for e in self.events if e.logprob is not None]

    @property
    def prompt_logprobs(self):
        return next((e.prompt_logprobs for e in self.events if e.prompt_logprobs), None)


def check_n(state, n: int | None) -> int:
    n = 1 if n is None else n
    if n > state.config.max_n:
        raise APIError(
            400,
            f"n is {n}; this server allows at most {state.config.max_n} (lorafleet serve --max-n)",
            code="invalid_request",
            param="n",
        )
    return n


async def submit_all(
    state,
    adapter,
    prompts: list[list[int]],
    params: list[SamplingParams],
    n: int,
    lease: Lease | None = None,
) -> list[Choice]:
    """n engine requests per prompt (choice index prompt * n + i), each tracked by `lease`
    (its tenant's limits and fair share); a seeded request's i-th choice uses seed + i, so
    choices differ and each is reproducible."""
    choices = []
    try:
        for p, (ids, base) in enumerate(zip(prompts, params, strict=True)):
            for i in range(n):
                seeded = base if base.seed is None else replace(base, seed=base.seed + i)
                stream = await gen.submit(state, ids, adapter, seeded, lease)
                choices.append(Choice(p * n + i, ids, stream))
    except BaseException:  # e.g. the queue filled up part way: free what was queued
        cancel_all(state, choices)
        raise
    return choices


def cancel_all(state, choices: list[Choice]) -> None:
    for choice in choices:
        state.streams.cancel(choice.stream)


async def first_events(state, request: Request, choices: list[Choice]) -> bool:
    """Wait for every choice's first event; False (all cancelled) if the client left. A failed
    choice raises its HTTP error after the others are cancelled."""
    firsts = await asyncio.gather(*(gen.next_event(state, request, c.stream) for c in choices))
    if any(event is None for event in firsts):
        cancel_all(state, choices)
        return False
    for choice, event in zip(choices, firsts, strict=True):
        choice.events.append(event)
    for choice in choices:
        if choice.stream.finish_reason == "error":
            cancel_all(state, choices)
            raise gen.failure(choice.stream)
    return True


async def collect_all(state, request: Request, choices: list[Choice]) -> bool:
    """Every choice's remaining events; False (all cancelled) if the client left."""

    async def rest(choice: Choice) -> bool:
        while not choice.stream.done:
            event = await gen.next_event(state, request, choice.stream)
            if event is None:
                return False
            choice.events.append(event)
        return True

    if not all(await asyncio.gather(*(rest(c) for c in choices))):
        cancel_all(state, choices)
        return False
    failed = next((c for c in choices if c.stream.finish_reason == "error"), None)
    if failed is not None:
        raise gen.failure(failed.stream)
    return True


def usage(choices: list[Choice]) -> Usage:
    """Prompt tokens once per distinct prompt (as OpenAI counts n), completions summed."""
    prompts = {id(c.prompt_ids): len(c.prompt_ids) for c in choices}
    return Usage.of(sum(prompts.values()), sum(c.stream.completion_tokens for c in choices))


def stream_response(
    state, rec: RequestRecord, choices: list[Choice], shape, include_usage: bool
) -> StreamingResponse:
    """SSE over every choice's events as they arrive, each chunk naming its choice's index:
    `shape.head` pieces first, `shape.on_event` pieces per event, the usage chunk if asked,
    then [DONE]."""

    async def events():
        status, pending = CLIENT_CLOSED, {}
        try:
            for choice in choices:  # the first events arrived before the answer started
                for piece in [*shape.head(choice), *shape.on_event(choice, choice.events[0])]:
                    yield gen.sse(piece)
            pending = {
                asyncio.ensure_future(c.stream.__anext__()): c for c in choices if not c.stream.done
            }
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    choice = pending.pop(task)
                    event = task.result()
                    choice.events.append(event)
                    for piece in shape.on_event(choice, event):
                        yield gen.sse(piece)
                    if not choice.stream.done:
                        pending[asyncio.ensure_future(choice.stream.__anext__())] = choice
            if include_usage:
                yield gen.sse(shape.usage_chunk(shape.usage(choices)))
            yield gen.sse("[DONE]")
            failed = {
                gen.failure(c.stream).status for c in choices if c.stream.finish_reason == "error"
            }
            status = (503 if 503 in failed else 500) if failed else 200  # 503: a drain cut it
        finally:
            for task in pending:
                task.cancel()
            cancel_all(state, choices)  # a no-op when finished; frees the KV on a disconnect
            rec.finish(status)

    rec.defer()
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# -- log-probabilities in OpenAI's shapes ---------------------------------------------------


def token_text(tokenizer, token_id: int) -> str:
    """A token as text (a partial UTF-8 character decodes as U+FFFD)."""
    return tokenizer.decode([token_id])


def completion_logprobs(
    tokenizer, entries: list[TokenLogprob | None], ids: list[int], offset: int = 0
) -> CompletionLogprobs:
    """The legacy shape: tokens, token_logprobs, top_logprobs ({token text: logprob}) and
    text_offset (each token's start in the choice's text, from `offset`); an entry None (the
    first prompt token) gives null logprob and top_logprobs."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[
            None if e is None else {token_text(tokenizer, i): v for i, v in e.top} for e in entries
        ],
        text_offset=offsets,
    )


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [...]}]."""

    def one(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        TokenLogprobOut(**one(e.token_id, e.logprob), top_logprobs=[one(i, v) for i, v in e.top])
        for e in entries
    ]
    return ChatLogprobs(content=content)
