"""LoRAX-style routes: POST /generate and /generate_stream (`adapter_id` or `merged_adapters`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lorafleet.serve.api import generation as gen
from lorafleet.serve.api import mixtures, structured
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.recording import CLIENT_CLOSED, RequestRecord, record
from lorafleet.serve.api.responses import (
    Generated,
    GenerateDetails,
    GenerateEvent,
    GenerateFailed,
    GenerateTokenDetails,
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
    grammar = structured.response_grammar(p.response_format, "parameters.response_format")
    await structured.check(grammar, "parameters.response_format")
    # LoRAX/TGI semantics: greedy unless do_sample, whatever the temperature says.
    temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
    params = gen.sampling(
        state,
        len(ids),
        max_tokens=p.max_new_tokens,
        default=20,
        temperature=temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        stop=p.stop,
        logprobs=0,  # the clients need each logprob
        grammar=grammar,
    )
    lease = gen.admit(state, rec, who, [(len(ids), params.max_tokens)])  # 429 over limits
    stream = await gen.submit(state, ids, adapter, params, lease)
    rec.started(rec.label, stream)
    first = await gen.next_event(state, request, stream)
    if first is not None and first.finished and first.finish_reason == "error":
        raise gen.failure(stream)
    return stream, first


def _reason(state, stream, last_token: int | None, grammar: bool = False) -> str | None:
    """TGI/LoRAX's finish reasons: length, eos_token (the model's EOS, or the end of a
    response_format's document), stop_sequence."""
    if stream.finish_reason != "stop":
        return stream.finish_reason
    return "eos_token" if grammar or last_token in state.backend.eos_ids else "stop_sequence"


def _details(stream, reason=None) -> GenerateDetails:
    return GenerateDetails(
        finish_reason=reason or stream.finish_reason,
        generated_tokens=stream.completion_tokens,
        prompt_tokens=stream.prompt_tokens,
    )


def _token(event) -> StreamToken:
    logprob = event.logprob.logprob if event.logprob is not None else None
    return StreamToken(id=event.token_id, text=event.text, logprob=logprob)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, who: Principal = Depends(principal)):
    state = state_of(request)
    with record(state, "generate") as rec:
        stream, first = await _begin(state, body, request, rec, who)
        events = [first]
        while events[-1] is not None and not stream.done:
            events.append(await gen.next_event(state, request, stream))
        if events[-1] is None:
            return rec.client_closed()
        if stream.finish_reason == "error":
            raise gen.failure(stream)
        tokens = [_token(e) for e in events if e.token_id is not None]
        grammar = body.parameters.response_format is not None
        reason = _reason(state, stream, tokens[-1].id if tokens else None, grammar)
        details = _details(stream, reason)
        if (body.parameters.model_extra or {}).get("details"):  # TGI: per-token details
            details = GenerateTokenDetails(**details.model_dump(), tokens=tokens)
        return Generated(generated_text="".join(e.text for e in events), details=details)


@router.post("/")
async def generate_root(
    body: GenerateRequest, request: Request, who: Principal = Depends(principal)
):
    """LoRAX's and TGI's compat route (what their Python clients call): `stream` picks
    /generate_stream or /generate (whose answer comes in a list, as TGI's does)."""
    if (body.model_extra or {}).get("stream") is True:
        return await generate_stream(body, request, who)
    out = await generate(body, request, who)
    return [out] if isinstance(out, Generated) else out


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, request: Request, who: Principal = Depends(principal)
):
    state = state_of(request)
    with record(state, "generate_stream") as rec:
        stream, first = await _begin(state, body, request, rec, who)
        if first is None:
            return rec.client_closed()
        rec.defer()
        return StreamingResponse(
            _events(state, rec, stream, first, body.parameters.response_format is not None),
            media_type="text/event-stream",
        )


async def _events(state, rec: RequestRecord, stream, event, grammar: bool = False):
    """The token events of a /generate_stream request; records it when the stream ends."""
    status, text = CLIENT_CLOSED, []
    try:
        while True:
            text.append(event.text)
            done = event.finished
            token = None if event.token_id is None else _token(event)
            reason = _reason(state, stream, event.token_id, grammar) if done else None
            fields = {
                "token": token,
                "generated_text": "".join(text) if done else None,
                "details": _details(stream, reason) if done else None,
            }
            if done and event.finish_reason == "error":
                yield gen.sse(GenerateFailed(**fields, error=gen.failure(stream).message))
            else:
                yield gen.sse(GenerateEvent(**fields))
            if done:
                failed = event.finish_reason == "error"
                status = max(500, gen.failure(stream).status) if failed else 200  # 503: cut
                return
            event = await stream.__anext__()
    finally:
        state.streams.cancel(stream)
        rec.finish(status)
