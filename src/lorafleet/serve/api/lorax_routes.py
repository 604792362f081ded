"""LoRAX-style routes: POST /generate and /generate_stream with `parameters.adapter_id`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafleet.serve.api import generation as gen
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.schemas import GenerateRequest
from lorafleet.serve.api.state import principal, state_of

router = APIRouter()


async def _begin(body: GenerateRequest, request: Request, who, endpoint: str):
    state = state_of(request)
    p = body.parameters
    if p.merged_adapters is not None:
        raise APIError(400, "merged_adapters is not supported yet (it lands with adapter "
                       "composition); use one adapter_id", code="not_supported",
                       param="parameters.merged_adapters")  # fmt: skip
    model = p.adapter_id or state.config.model_name
    adapter = state.resolve(model, who)
    ids = state.tokenizer(body.inputs)["input_ids"]
    gen.check_prompt(state, ids)
    # LoRAX/TGI semantics: greedy unless do_sample, whatever the temperature says.
    temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
    params = gen.sampling(state, len(ids), max_tokens=p.max_new_tokens, default=20,
                          temperature=temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                          stop=p.stop)  # fmt: skip
    stream = await gen.submit(state, ids, adapter, params)
    first = await gen.next_event(state, request, stream)
    label = adapter or state.config.model_name
    if first is not None and first.finished and first.finish_reason == "error":
        err = gen.failure(stream)
        state.metrics.finished(endpoint, label, err.status, stream)
        raise err
    return state, stream, first, label


def _details(stream) -> dict:
    return {"finish_reason": stream.finish_reason, "generated_tokens": stream.completion_tokens,
            "prompt_tokens": stream.prompt_tokens}  # fmt: skip


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, who: Principal = Depends(principal)):
    state, stream, first, label = await _begin(body, request, who, "generate")
    rest = await gen.collect(state, request, stream) if first is not None else None
    if first is None or rest is None:
        state.metrics.finished("generate", label, 499, stream)
        return JSONResponse({}, status_code=499)
    if stream.finish_reason == "error":
        err = gen.failure(stream)
        state.metrics.finished("generate", label, err.status, stream)
        raise err
    state.metrics.finished("generate", label, 200, stream)
    return {"generated_text": first.text + rest, "details": _details(stream)}


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request,
                          who: Principal = Depends(principal)):  # fmt: skip
    state, stream, first, label = await _begin(body, request, who, "generate_stream")
    if first is None:
        state.metrics.finished("generate_stream", label, 499, stream)
        return JSONResponse({}, status_code=499)

    async def events():
        status, text, event = 499, [], first
        try:
            while True:
                text.append(event.text)
                done = event.finished
                token = (
                    None
                    if event.token_id is None
                    else {
                        "id": event.token_id,
                        "text": event.text,
                        "logprob": None,
                        "special": False,
                    }
                )
                payload = {"token": token, "generated_text": "".join(text) if done else None,
                           "details": _details(stream) if done else None}  # fmt: skip
                if done and event.finish_reason == "error":
                    payload["error"] = gen.failure(stream).message
                yield gen.sse(payload)
                if done:
                    status = 200 if event.finish_reason != "error" else 500
                    return
                event = await stream.__anext__()
        finally:
            state.loop.cancel(stream)
            state.metrics.finished("generate_stream", label, status, stream)

    return StreamingResponse(events(), media_type="text/event-stream")
