"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request

from lorafleet.models.chat import chat_prompt, has_chat_template
from lorafleet.serve.api import choices as choices_mod
from lorafleet.serve.api import generation as gen
from lorafleet.serve.api import mixtures, structured
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.choice_shapes import ChatShape, CompletionShape
from lorafleet.serve.api.classify import class_probs, not_calibrated
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.recording import RequestRecord, record
from lorafleet.serve.api.responses import (
    AdapterCard,
    ClassifyChoice,
    CompletionWithUsage,
    ModelCard,
    ModelList,
    MoleCard,
    Usage,
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
    if state.moles is not None and name in state.moles:
        return MoleCard(
            id=name,
            created=state.created,
            owned_by=owner,
            parent=base,
            root=name,
            experts=state.moles.experts(name),
        )
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


def _turn(message, plan: structured.ToolPlan | None) -> dict:
    """A request message as the chat template's turn. An assistant turn's `tool_calls` and a
    tool turn's `tool_call_id` go along for a template that renders tools; for one that does
    not, an assistant's calls become its content (the JSON the model would have written)."""
    turn = {"role": "system" if message.role == "developer" else message.role}
    turn["content"] = message.text()
    extra = message.model_extra or {}
    calls = extra.get("tool_calls")
    if plan is not None and plan.render:
        turn.update({k: extra[k] for k in ("tool_calls", "tool_call_id", "name") if k in extra})
    elif isinstance(calls, list) and calls and not turn["content"]:
        turn["content"] = json.dumps([c.get("function", c) for c in calls if isinstance(c, dict)])
    return turn


def chat_prompt_ids(tokenizer, messages, plan: structured.ToolPlan | None = None) -> list[int]:
    """The base's chat template applied (generation prompt added); a plain fallback without one.
    `plan`'s tools go to a template that renders them, else (a forced call) into the system
    message."""
    turns = [_turn(m, plan) for m in messages]
    note = plan.system_note() if plan is not None else None
    if note and turns[0]["role"] == "system":
        turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{note}"}
    elif note:
        turns.insert(0, {"role": "system", "content": note})
    if has_chat_template(tokenizer):
        from jinja2 import TemplateError  # what apply_chat_template renders with

        tools = plan.template_tools() if plan is not None else None
        try:
            return chat_prompt(tokenizer, turns, tokenize=True, tools=tools)
        except TemplateError as exc:  # e.g. Mistral's: roles must alternate user/assistant
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise APIError(
                400,
                f"messages: the model's chat template refused them: {message}",
                code="invalid_request",
                param="messages",
            ) from None
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tokenizer(text)["input_ids"]


async def _start(
    state: ServerState,
    request: Request,
    rec: RequestRecord,
    body,
    who,
    prompts: list[list[int]],
    params_kw: dict,
    default_max: int,
):
    """Submit n choices per prompt; (choices, False when the client left meanwhile)."""
    adapter, label = await mixtures.openai_adapter(state, who, body.model, body.adapters, body.mask)
    rec.started(label)
    n = choices_mod.check_n(state, body.n)
    for ids in prompts:
        gen.check_prompt(state, ids)
    params = [gen.sampling(state, len(ids), default=default_max, **params_kw) for ids in prompts]
    sizes = [(len(ids), p.max_tokens) for ids, p in zip(prompts, params, strict=True)]
    lease = gen.admit(state, rec, who, sizes * n)  # 429 over the tenant's limits
    choices = await choices_mod.submit_all(state, adapter, prompts, params, n, lease)
    rec.started(rec.label, choices[0].stream)
    # Wait for the first events before answering, so a failed request gets a real status code.
    return choices, await choices_mod.first_events(state, request, choices)


async def _respond(
    state: ServerState,
    request: Request,
    rec: RequestRecord,
    body,
    prompts: list[list[int]],
    who,
    default_max: int,
    shape,
) -> object:
    """Run a request's choices; `shape` (a choice_shapes.Shape) shapes chunks and the answer."""
    kw = {
        "max_tokens": getattr(body, "max_completion_tokens", None) or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": body.stop,
        "ignore_eos": body.ignore_eos,
        **shape.sampling_kw(),
    }
    choices, present = await _start(state, request, rec, body, who, prompts, kw, default_max)
    if not present:  # the client left before the first token
        return rec.client_closed()
    if not body.stream:
        if not await choices_mod.collect_all(state, request, choices):
            return rec.client_closed()
        return shape.final(choices)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return choices_mod.stream_response(state, rec, choices, shape, include_usage)


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, who: Principal = Depends(principal)
):
    state = state_of(request)
    with record(state, "classify" if body.class_choices is not None else "completions") as rec:
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt of token ids
        prompts = [
            state.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts
        ]
        for ids in prompts:
            gen.check_prompt(state, ids)  # before any decoding of caller-given ids
        if body.class_choices is not None:
            prompt = body.prompt[0] if isinstance(body.prompt[0], str) else prompts[0]
            return await _classify(
                state, rec, body, body.prompt if isinstance(body.prompt, str) else prompt, who
            )
        grammar = structured.response_grammar(body.response_format)
        await structured.check(grammar)
        shape = CompletionShape(
            gen.new_id("cmpl"), gen.now(), body.model, body, state.tokenizer, grammar
        )
        return await _respond(
            state, request, rec, body, prompts, who, COMPLETIONS_DEFAULT_MAX_TOKENS, shape
        )


async def _classify(
    state: ServerState, rec: RequestRecord, body: CompletionRequest, prompt, who
) -> CompletionWithUsage:
    """Class probabilities of `class_choices` after `prompt` (no generation)."""
    if body.adapters is not None or body.model.startswith(mixtures.MIX_PREFIX):
        raise APIError(
            400,
            "class_choices scores one calibrated adapter, not a mixture",
            code="invalid_request",
            param="class_choices",
        )
    adapter = await asyncio.to_thread(state.resolve, body.model, who)  # may re-check an entry
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
    return CompletionWithUsage(
        id=gen.new_id("cmpl"),
        created=gen.now(),
        model=body.model,
        choices=[choice],
        usage=Usage.of(len(ids), 0),
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, who: Principal = Depends(principal)
):
    state = state_of(request)
    with record(state, "chat") as rec:
        plan = structured.tool_plan(body, state.tokenizer)
        grammar = plan.grammar or structured.response_grammar(body.response_format)
        await structured.check(grammar, "tools" if plan.grammar else "response_format")
        ids = chat_prompt_ids(state.tokenizer, body.messages, plan)
        shape = ChatShape(
            gen.new_id("chatcmpl"), gen.now(), body.model, body, state.tokenizer, plan, grammar
        )
        return await _respond(
            state, request, rec, body, [ids], who, state.config.default_max_tokens, shape
        )


__all__ = ["chat_prompt_ids", "model_not_found", "router"]
