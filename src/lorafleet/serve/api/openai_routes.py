"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafleet.serve.api import generation as gen
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.classify import class_probs, not_calibrated
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.schemas import ChatCompletionRequest, CompletionRequest
from lorafleet.serve.api.state import ServerState, principal, state_of

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
BASE_OWNER = "lorafleet"


def _model_card(state: ServerState, name: str, created: int) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": BASE_OWNER}
    if name != state.config.model_name:
        card.update(parent=state.config.model_name, root=name,
                    owned_by=state.auth.owner.get(name, BASE_OWNER))  # fmt: skip
    return card


@router.get("/v1/models")
def list_models(request: Request, who: Principal = Depends(principal)) -> dict:
    state = state_of(request)
    names = [n for n in state.adapter_names() if state.auth.can_use(who, n)]
    created = state.created
    data = [_model_card(state, state.config.model_name, created)]
    data += [_model_card(state, name, created) for name in names]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}")
def get_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict:
    state = state_of(request)
    state.resolve(model_id, who)  # 404 for a missing or hidden adapter
    return _model_card(state, model_id, state.created)


def _usage(stream) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}  # fmt: skip


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The base's chat template applied (generation prompt added); a plain fallback without one."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
             for m in messages]  # fmt: skip
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(t) for t in ids]
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tokenizer(text)["input_ids"]


async def _start(state: ServerState, request: Request, model: str, who,
                 ids: list[int], params_kw: dict, default_max: int):  # fmt: skip
    adapter = state.resolve(model, who)
    gen.check_prompt(state, ids)
    params = gen.sampling(state, len(ids), default=default_max, **params_kw)
    stream = await gen.submit(state, ids, adapter, params)
    # Wait for the first event before answering, so a failed request gets a real status code.
    first = await gen.next_event(state, request, stream)
    return adapter, stream, first


def _label(adapter: str | None, state: ServerState) -> str:
    return adapter or state.config.model_name


async def _respond(state: ServerState, request: Request, body, endpoint: str, ids: list[int],
                   who, default_max: int, chunk, final) -> object:  # fmt: skip
    """Run one request; `chunk(text, finish_reason)` and `final(text, stream)` shape the output."""
    kw = {"max_tokens": getattr(body, "max_completion_tokens", None) or body.max_tokens,
          "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
          "seed": body.seed, "stop": body.stop}  # fmt: skip
    try:
        adapter, stream, first = await _start(state, request, body.model, who, ids, kw,
                                              default_max)  # fmt: skip
    except APIError as exc:
        state.metrics.finished(endpoint, "-" if exc.status == 404 else body.model, exc.status)
        raise
    label = _label(adapter, state)
    if first is None:  # the client left before the first token
        state.metrics.finished(endpoint, label, 499, stream)
        return JSONResponse({}, status_code=499)
    if first.finished and first.finish_reason == "error":
        err = gen.failure(stream)
        state.metrics.finished(endpoint, label, err.status, stream)
        raise err
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if not body.stream:
        rest = await gen.collect(state, request, stream)
        if rest is None:
            state.metrics.finished(endpoint, label, 499, stream)
            return JSONResponse({}, status_code=499)
        if stream.finish_reason == "error":
            err = gen.failure(stream)
            state.metrics.finished(endpoint, label, err.status, stream)
            raise err
        state.metrics.finished(endpoint, label, 200, stream)
        return final(first.text + rest, stream)

    async def events():
        status = 499
        try:
            for piece in chunk(None, None, first=True):
                yield gen.sse(piece)
            event = first
            while True:
                if event.finished:
                    if event.text:
                        yield gen.sse(chunk(event.text, None))
                    reason = event.finish_reason if event.finish_reason in ("stop", "length") \
                        else "stop"  # fmt: skip
                    if event.finish_reason == "error":  # mid-stream failure: say so, then end
                        yield gen.sse(gen.failure(stream).body())
                    yield gen.sse(chunk("", reason))
                    if include_usage:
                        yield gen.sse(chunk(None, None, usage=_usage(stream)))
                    yield gen.sse("[DONE]")
                    status = 200 if event.finish_reason != "error" else 500
                    return
                if event.text:
                    yield gen.sse(chunk(event.text, None))
                event = await stream.__anext__()
        finally:
            state.loop.cancel(stream)  # a no-op when finished; frees the KV on a disconnect
            state.metrics.finished(endpoint, label, status, stream)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      who: Principal = Depends(principal)):  # fmt: skip
    state = state_of(request)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = list(prompt) if isinstance(prompt, list) else state.tokenizer(prompt)["input_ids"]
    gen.check_prompt(state, ids)  # before any decoding of caller-given ids
    if body.class_choices is not None:
        return await _classify(state, body, prompt, who)
    rid, created = gen.new_id("cmpl"), gen.now()
    echo = state.tokenizer.decode(ids) if body.echo else ""

    def chunk(text, reason, first=False, usage=None):
        if first:
            return [_completion_chunk(rid, created, body.model, echo, None)] if echo else []
        if usage is not None:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": body.model, "choices": [], "usage": usage}  # fmt: skip
        return _completion_chunk(rid, created, body.model, text, reason)

    def final(text, stream):
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": echo + text, "logprobs": None,
                             "finish_reason": stream.finish_reason}],
                "usage": _usage(stream)}  # fmt: skip

    return await _respond(state, request, body, "completions", ids, who,
                          COMPLETIONS_DEFAULT_MAX_TOKENS, chunk, final)  # fmt: skip


async def _classify(state: ServerState, body: CompletionRequest, prompt, who) -> dict:
    """Laplace-LoRA class probabilities of `class_choices` after `prompt` (no generation)."""
    adapter = state.resolve(body.model, who)
    if adapter is None:
        raise not_calibrated("class_choices needs a calibrated adapter, not the base model")
    if not isinstance(prompt, str):
        prompt = state.tokenizer.decode(prompt)
    ids = state.tokenizer(prompt)["input_ids"]
    gen.check_prompt(state, ids)
    choices = body.class_choices
    out = await asyncio.to_thread(class_probs, state.classifier, adapter, prompt, choices)
    best = max(range(len(out["probs"])), key=out["probs"].__getitem__)
    state.metrics.finished("classify", adapter, 200)
    return {"id": gen.new_id("cmpl"), "object": "text_completion", "created": gen.now(),
            "model": body.model,
            "choices": [{"index": 0, "text": body.class_choices[best], "logprobs": None,
                         "finish_reason": "stop", "class_probs": out}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 0,
                      "total_tokens": len(ids)}}  # fmt: skip


def _completion_chunk(rid, created, model, text, reason) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None,
                         "finish_reason": reason}]}  # fmt: skip


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           who: Principal = Depends(principal)):  # fmt: skip
    state = state_of(request)
    ids = chat_prompt_ids(state.tokenizer, body.messages)
    rid, created = gen.new_id("chatcmpl"), gen.now()

    def piece(delta: dict, reason) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": reason}]}  # fmt: skip

    def chunk(text, reason, first=False, usage=None):
        if first:  # the role comes first, in a delta of its own
            return [piece({"role": "assistant", "content": ""}, None)]
        if usage is not None:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": body.model, "choices": [], "usage": usage}  # fmt: skip
        return piece({"content": text} if text else {}, reason)

    def final(text, stream):
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": stream.finish_reason}],
                "usage": _usage(stream)}  # fmt: skip

    return await _respond(state, request, body, "chat", ids, who,
                          state.config.default_max_tokens, chunk, final)  # fmt: skip


__all__ = ["chat_prompt_ids", "model_not_found", "router"]
