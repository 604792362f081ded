"""LoRAX-style routes: POST /generate and /generate_stream (`adapter_id` or `merged_adapters`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lorafleet.serve.api import generation as gen
from lorafleet.serve.api import mixtures
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.recording import CLIENT_CLOSED, RequestRecord, record
from lorafleet.serve.api.responses import (
    Generated,
    GenerateDetails,
    GenerateEvent,
    GenerateFailed,
    StreamToken,
)
from lorafleet.serve.api.schemas import GenerateRequest
from lorafleet.serve.api.state import principal, state_of

router = APIRouter()


async def _begin(state, body: GenerateRequest, request: Request, rec: RequestRecord, who):
    """Resolve, check and submit a request; its stream and first event (None: client left)."""
    p = body.parameters
    adapter, label = await mixtures.lorax_adapter(state, who, p)
    rec.started(label)
    ids = state.tokenizer(body.inputs)["input_ids"]
    gen.check_prompt(state, ids)
    # LoRAX/TGI semantics: greedy unless do_sample, whatever the temperature says.
    temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
    params = gen.sampling(state, len(ids), max_tokens=p.max_new_tokens, default=20,
                          temperature=temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                          stop=p.stop)  # fmt: skip
    stream = await gen.submit(state, ids, adapter, params)
    rec.started(rec.label, stream)
    first = await gen.next_event(state, request, stream)
    if first is not None and first.finished and first.finish_reason == "error":
        raise gen.failure(stream)
    return stream, first


def _details(stream) -> GenerateDetails:
    return GenerateDetails(finish_reason=stream.finish_reason,
                           generated_tokens=stream.completion_tokens,
                           prompt_tokens=stream.prompt_tokens)  # fmt: skip


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, who: Principal = Depends(principal)):
    state = state_of(request)
    with record(state, "generate") as rec:
        stream, first = await _begin(state, body, request, rec, who)
        rest = await gen.collect(state, request, stream) if first is not None else None
        if first is None or rest is None:
            return rec.client_closed()
        if stream.finish_reason == "error":
            raise gen.failure(stream)
        return Generated(generated_text=first.text + rest, details=_details(stream))


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request,
                          who: Principal = Depends(principal)):  # fmt: skip
    state = state_of(request)
    with record(state, "generate_stream") as rec:
        stream, first = await _begin(state, body, request, rec, who)
        if first is None:
            return rec.client_closed()
        rec.defer()
        return StreamingResponse(_events(state, rec, stream, first),
                                 media_type="text/event-stream")  # fmt: skip


async def _events(state, rec: RequestRecord, stream, event):
    """The token events of a /generate_stream request; records it when the stream ends."""
    status, text = CLIENT_CLOSED, []
    try:
        while True:
            text.append(event.text)
            done = event.finished
            token = None if event.token_id is None else StreamToken(id=event.token_id,
                                                                    text=event.text)  # fmt: skip
            fields = {"token": token, "generated_text": "".join(text) if done else None,
                      "details": _details(stream) if done else None}  # fmt: skip
            if done and event.finish_reason == "error":
                yield gen.sse(GenerateFailed(**fields, error=gen.failure(stream).message))
            else:
                yield gen.sse(GenerateEvent(**fields))
            if done:
                status = 200 if event.finish_reason != "error" else 500
                return
            event = await stream.__anext__()
    finally:
        state.loop.cancel(stream)
        rec.finish(status)
