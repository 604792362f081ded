"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lorafleet.models.chat import chat_prompt, has_chat_template
from lorafleet.serve.api import generation as gen
from lorafleet.serve.api import mixtures
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.classify import class_probs, not_calibrated
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.recording import CLIENT_CLOSED, RequestRecord, record
from lorafleet.serve.api.responses import (
    AdapterCard,
    ChatChoice,
    ChatChunk,
    ChatCompletion,
    ChatDeltaChoice,
    ChatMessageOut,
    ClassifyChoice,
    Completion,
    CompletionChoice,
    CompletionWithUsage,
    ModelCard,
    ModelList,
    Usage,
    UsageChunk,
)
from lorafleet.serve.api.schemas import ChatCompletionRequest, CompletionRequest
from lorafleet.serve.api.state import ServerState, principal, state_of

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
BASE_OWNER = "lorafleet"


def _model_card(state: ServerState, name: str) -> ModelCard:
    base = state.config.model_name
    if name == base:
        return ModelCard(id=name, created=state.created, owned_by=BASE_OWNER)
    owner = state.auth.owner.get(name, BASE_OWNER)
    return AdapterCard(id=name, created=state.created, owned_by=owner, parent=base, root=name)


@router.get("/v1/models", response_model=None)
def list_models(request: Request, who: Principal = Depends(principal)) -> ModelList:
    state = state_of(request)
    names = [n for n in state.adapter_names() if state.auth.can_use(who, n)]
    names.insert(0, state.config.model_name)
    return ModelList(data=[_model_card(state, name) for name in names])


@router.get("/v1/models/{model_id}", response_model=None)
def get_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> ModelCard:
    state = state_of(request)
    state.resolve(model_id, who)  # 404 for a missing or hidden adapter
    return _model_card(state, model_id)


def _usage(stream) -> Usage:
    return Usage.of(stream.prompt_tokens, stream.completion_tokens)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The base's chat template applied (generation prompt added); a plain fallback without one."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
             for m in messages]  # fmt: skip
    if has_chat_template(tokenizer):
        return chat_prompt(tokenizer, turns, tokenize=True)
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tokenizer(text)["input_ids"]


async def _start(state: ServerState, request: Request, rec: RequestRecord, body, who,
                 ids: list[int], params_kw: dict, default_max: int):  # fmt: skip
    adapter, label = await mixtures.openai_adapter(state, who, body.model, body.adapters)
    rec.started(label)
    gen.check_prompt(state, ids)
    params = gen.sampling(state, len(ids), default=default_max, **params_kw)
    stream = await gen.submit(state, ids, adapter, params)
    rec.started(rec.label, stream)
    # Wait for the first event before answering, so a failed request gets a real status code.
    first = await gen.next_event(state, request, stream)
    return stream, first


async def _respond(state: ServerState, request: Request, rec: RequestRecord, body,
                   ids: list[int], who, default_max: int, chunk, final) -> object:  # fmt: skip
    """Run one request; `chunk(text, finish_reason)` and `final(text, stream)` shape the output."""
    kw = {"max_tokens": getattr(body, "max_completion_tokens", None) or body.max_tokens,
          "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
          "seed": body.seed, "stop": body.stop, "ignore_eos": body.ignore_eos}  # fmt: skip
    stream, first = await _start(state, request, rec, body, who, ids, kw, default_max)
    if first is None:  # the client left before the first token
        return rec.client_closed()
    if first.finished and first.finish_reason == "error":
        raise gen.failure(stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if not body.stream:
        rest = await gen.collect(state, request, stream)
        if rest is None:
            return rec.client_closed()
        if stream.finish_reason == "error":
            raise gen.failure(stream)
        return final(first.text + rest, stream)

    async def events():
        status = CLIENT_CLOSED
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
            rec.finish(status)

    rec.defer()
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      who: Principal = Depends(principal)):  # fmt: skip
    state = state_of(request)
    with record(state, "classify" if body.class_choices is not None else "completions") as rec:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = list(prompt) if isinstance(prompt, list) else state.tokenizer(prompt)["input_ids"]
        gen.check_prompt(state, ids)  # before any decoding of caller-given ids
        if body.class_choices is not None:
            return await _classify(state, rec, body, prompt, who)
        return await _complete(state, request, rec, body, ids, who)


async def _complete(state: ServerState, request: Request, rec: RequestRecord,
                    body: CompletionRequest, ids: list[int], who):  # fmt: skip
    rid, created, model = gen.new_id("cmpl"), gen.now(), body.model
    echo = state.tokenizer.decode(ids) if body.echo else ""

    def piece(text: str, reason) -> Completion:
        choice = CompletionChoice(text=text or "", finish_reason=reason)
        return Completion(id=rid, created=created, model=model, choices=[choice])

    def chunk(text, reason, first=False, usage=None):
        if first:
            return [piece(echo, None)] if echo else []
        if usage is not None:
            return UsageChunk(id=rid, object="text_completion", created=created, model=model,
                              usage=usage)  # fmt: skip
        return piece(text, reason)

    def final(text, stream) -> CompletionWithUsage:
        choice = CompletionChoice(text=echo + text, finish_reason=stream.finish_reason)
        return CompletionWithUsage(id=rid, created=created, model=model, choices=[choice],
                                   usage=_usage(stream))  # fmt: skip

    return await _respond(state, request, rec, body, ids, who, COMPLETIONS_DEFAULT_MAX_TOKENS,
                          chunk, final)  # fmt: skip


async def _classify(state: ServerState, rec: RequestRecord, body: CompletionRequest, prompt,
                    who) -> CompletionWithUsage:  # fmt: skip
    """Class probabilities of `class_choices` after `prompt` (no generation)."""
    if body.adapters is not None or body.model.startswith(mixtures.MIX_PREFIX):
        raise APIError(400, "class_choices scores one calibrated adapter, not a mixture",
                       code="invalid_request", param="class_choices")  # fmt: skip
    adapter = state.resolve(body.model, who)
    if adapter is None:
        raise not_calibrated("class_choices needs a calibrated adapter, not the base model")
    rec.started(adapter)
    if not isinstance(prompt, str):
        prompt = state.tokenizer.decode(prompt)
    ids = state.tokenizer(prompt)["input_ids"]
    gen.check_prompt(state, ids)
    choices = body.class_choices
    out = await asyncio.to_thread(class_probs, state.classifier, adapter, prompt, choices)
    best = max(range(len(out["probs"])), key=out["probs"].__getitem__)
    choice = ClassifyChoice(text=choices[best], finish_reason="stop", class_probs=out)
    return CompletionWithUsage(id=gen.new_id("cmpl"), created=gen.now(), model=body.model,
                               choices=[choice], usage=Usage.of(len(ids), 0))  # fmt: skip


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           who: Principal = Depends(principal)):  # fmt: skip
    state = state_of(request)
    with record(state, "chat") as rec:
        ids = chat_prompt_ids(state.tokenizer, body.messages)
        rid, created, model = gen.new_id("chatcmpl"), gen.now(), body.model

        def piece(delta: dict, reason) -> ChatChunk:
            choice = ChatDeltaChoice(delta=delta, finish_reason=reason)
            return ChatChunk(id=rid, created=created, model=model, choices=[choice])

        def chunk(text, reason, first=False, usage=None):
            if first:  # the role comes first, in a delta of its own
                return [piece({"role": "assistant", "content": ""}, None)]
            if usage is not None:
                return UsageChunk(id=rid, object="chat.completion.chunk", created=created,
                                  model=model, usage=usage)  # fmt: skip
            return piece({"content": text} if text else {}, reason)

        def final(text, stream) -> ChatCompletion:
            choice = ChatChoice(message=ChatMessageOut(content=text),
                                finish_reason=stream.finish_reason)  # fmt: skip
            return ChatCompletion(id=rid, created=created, model=model, choices=[choice],
                                  usage=_usage(stream))  # fmt: skip

        return await _respond(state, request, rec, body, ids, who,
                              state.config.default_max_tokens, chunk, final)  # fmt: skip


__all__ = ["chat_prompt_ids", "model_not_found", "router"]
