"""Structured output on the HTTP side: `response_format` and `tools` / `tool_choice` turned
into a grammar for the engine (serve/grammar.py), checked before anything is queued (a bad
schema is a 400 naming the problem), and a generated tool call turned back into OpenAI's
`tool_calls`.

Tool calls: `tool_choice` "required" or a named function constrains the answer to the JSON
`{"name": <a tool's name>, "arguments": <an object valid against its parameters>}` (any model:
when its chat template does not render tools, they are described in a system message), and the
answer is `message.tool_calls` with finish_reason "tool_calls". "auto" (the default when tools
are given) leaves the model free on a chat template that declares tools, and an answer that is
such a JSON call (bare or inside <tool_call>...</tool_call>) becomes a tool call; on a template
without tools "auto" is "none": the tools are not shown and the answer is text. A call cut off
by max_tokens stays text with finish_reason "length"."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field

from lorafleet.serve.api.errors import APIError
from lorafleet.serve.grammar import GrammarError, GrammarSpec, GrammarUnavailable, unavailable

TOOL_CALL_TAG = re.compile(r"^\s*<tool_call>\s*(.*?)\s*(</tool_call>)?\s*$", re.DOTALL)
TOOLS_PROMPT = (
    "You can call one of these functions. To call one, answer with only a JSON object "
    '{"name": <the function name>, "arguments": <its arguments as a JSON object>}.\n'
)


def unavailable_error() -> APIError | None:
    """The 501 for structured output on a server without its grammar engine, or None."""
    problem = unavailable()
    if problem is None:
        return None
    return APIError(501, problem, code="structured_output_unavailable", param="response_format")


def response_grammar(fmt, param: str = "response_format") -> GrammarSpec | None:
    """The grammar of a `response_format` (schemas.ResponseFormat) or None for text; a 400
    naming the problem (and `param`) for a schema the engine would not enforce, or for type
    json_schema without its `json_schema` or its `json_schema.schema` (never json_object)."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.schema_
    where = f"{param}.schema"
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(
                400,
                f"{param}.json_schema is required when type is json_schema",
                code="invalid_request",
                param=f"{param}.json_schema",
            )
        schema, where = fmt.json_schema.schema_, f"{param}.json_schema.schema"
        if schema is None:  # OpenAI refuses it too; it is not a request for json_object
            raise APIError(
                400,
                f"{where} is required when type is json_schema",
                code="invalid_request",
                param=where,
            )
    if schema is None:
        return GrammarSpec.json_object()
    try:
        return GrammarSpec.json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, f"{where}: {exc}", code="invalid_schema", param=where) from None


async def check(spec: GrammarSpec | None, param: str = "response_format") -> None:
    """Parse the grammar as the engine will, off the event loop: 400 for a schema the engine
    rejects, 501 when the engine is not installed."""
    if spec is None:
        return
    missing = unavailable_error()
    if missing is not None:
        raise missing
    try:
        await asyncio.to_thread(spec.check)
    except GrammarUnavailable as exc:
        raise APIError(501, str(exc), code="structured_output_unavailable", param=param) from None
    except GrammarError as exc:
        raise APIError(400, f"{param}: {exc}", code="invalid_schema", param=param) from None


@dataclass
class ToolPlan:
    """How a chat request's tools are served: `mode` "none" (text), "auto" (free text that
    may turn out to be a call) or "forced" (the grammar makes the answer a call); `tools` are
    the OpenAI function specs in play, `render` whether the chat template renders them itself,
    `grammar` the forced call's grammar."""

    mode: str = "none"
    tools: list[dict] = field(default_factory=list)
    render: bool = False
    grammar: GrammarSpec | None = None

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def system_note(self) -> str | None:
        """The system message describing the tools, for a template that cannot (forced only)."""
        if self.mode != "forced" or self.render:
            return None
        specs = [{k: v for k, v in t["function"].items() if v is not None} for t in self.tools]
        return TOOLS_PROMPT + json.dumps(specs, separators=(",", ":"))

    def template_tools(self) -> list[dict] | None:
        """What the chat template's `tools` gets (None: the template is not given tools)."""
        return self.tools if self.render and self.tools else None


def template_declares_tools(tokenizer) -> bool:
    """True when the tokenizer's chat template reads a `tools` variable."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def _params_schema(spec) -> dict:
    params = spec.parameters
    if params is None:
        return {"type": "object", "properties": {}}
    return params


def tool_plan(body, tokenizer) -> ToolPlan:
    """The plan for a chat request's `tools` and `tool_choice`; a 400 for a tool_choice naming
    no tool, a tool schema the engine would not enforce, or a forced call beside a
    response_format."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    render = template_declares_tools(tokenizer)
    specs = [t.model_dump(mode="json", exclude_none=True) for t in tools]
    if choice == "none" or not tools:
        if choice not in ("none", "auto"):
            raise APIError(
                400, "tool_choice needs tools", code="invalid_request", param="tool_choice"
            )
        return ToolPlan("none", specs, render)
    if choice == "auto":
        # A response_format answer is the format's JSON, never read as a call.
        formatted = body.response_format is not None and body.response_format.type != "text"
        mode = "auto" if render and not formatted else "none"
        return ToolPlan(mode, specs if render else [], render)
    if choice != "required":
        name = choice.function.name
        tools = [t for t in tools if t.function.name == name]
        if not tools:
            raise APIError(
                400,
                f"tool_choice names the function {name!r}, which is not among the tools",
                code="invalid_request",
                param="tool_choice",
            )
        specs = [t.model_dump(mode="json", exclude_none=True) for t in tools]
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            "response_format cannot be combined with a forced tool call (tool_choice "
            '"required" or a named function)',
            code="invalid_request",
            param="response_format",
        )
    branches = []
    for i, tool in enumerate(tools):
        params = _params_schema(tool.function)
        if not isinstance(params, dict):
            raise APIError(
                400,
                f"tools[{i}].function.parameters must be a JSON schema object",
                code="invalid_schema",
                param=f"tools[{i}].function.parameters",
            )
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.function.name}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    try:
        grammar = GrammarSpec.json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, f"tools: {exc}", code="invalid_schema", param="tools") from None
    return ToolPlan("forced", specs, render, grammar)


def parse_call(text: str, names: set[str]) -> dict | None:
    """The tool call a whole answer is ({"name", "arguments": dict}), or None: a JSON object
    with a known "name" and an object "arguments" (or "parameters"), bare or in a
    <tool_call> tag."""
    match = TOOL_CALL_TAG.match(text)
    body = match.group(1) if match else text
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return {"name": value["name"], "arguments": arguments}


def tool_call(call: dict) -> dict:
    """OpenAI's tool_calls entry for a parsed call (arguments as a JSON string)."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
    }


def might_be_call(text: str) -> bool:
    """Whether streamed text so far could still be the start of a tool call (auto mode holds
    it back until the answer ends): empty or whitespace, or it begins with "{" or with (a
    prefix of) "<tool_call>"."""
    head = text.lstrip()
    return not head or head.startswith("{") or "<tool_call>".startswith(head[:11])
