"""Structured output over HTTP with the real clients, unchanged: `response_format` (json_schema,
json_object) on /v1/chat/completions and /v1/completions, the openai client's `.parse()` with a
pydantic model, streaming, tool calls, LoRAX's `response_format` on /generate, and the 400s."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import SETTINGS, start
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/serve: the shared schemas
from grammar_schemas import LONG, SCHEMAS  # noqa: E402

from lorafleet.serve.api import structured  # noqa: E402
from lorafleet.serve.api.errors import APIError  # noqa: E402
from lorafleet.serve.api.openai_routes import chat_prompt_ids  # noqa: E402
from lorafleet.serve.api.schemas import ChatCompletionRequest  # noqa: E402

ASK = [{"role": "user", "content": "Answer in JSON."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
        },
    },
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


@pytest.fixture(scope="module")
def server(tokenizer, adapters_dir):
    """The tests' server with room for a forced call's tool descriptions in the prompt."""
    srv = start(tokenizer, adapters_dir, settings=replace(SETTINGS, max_seq_len=320))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def json_schema(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


class Address(BaseModel):
    city: str = Field(max_length=12)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=16)
    mood: Literal["happy", "sad"]
    address: Address


def test_openai_parse_with_a_pydantic_model(client):
    """client.chat.completions.parse(response_format=<pydantic model>) works unchanged."""
    out = client.chat.completions.parse(
        model="alpha", messages=ASK, response_format=Person, max_tokens=90, temperature=0
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_every_schema_validates_on_chat_and_completions(client):
    """Each schema on both routes, greedy and n=2 sampled, over adapters: all valid."""
    for i, name in enumerate(SCHEMAS):
        model = ["alpha", "beta", "tiny"][i % 3]
        fmt = json_schema(name)
        kw = {"model": model, "max_tokens": 90}
        chat = client.chat.completions.create(
            messages=ASK, temperature=0, response_format=fmt, **kw
        )
        text = client.completions.create(  # vLLM's extension: the client sends it as extra_body
            prompt="JSON:", temperature=1.0, seed=i, n=2, extra_body={"response_format": fmt}, **kw
        )
        answers = [c.message.content for c in chat.choices] + [c.text for c in text.choices]
        assert [c.finish_reason for c in chat.choices + text.choices] == ["stop"] * 3
        for answer in answers:
            jsonschema.validate(json.loads(answer), SCHEMAS[name])


def test_json_object_and_loraxs_schema_shape_on_the_openai_routes(client):
    """{"type": "json_object"} is an object; LoRAX's {"type": "json_object", "schema"} the
    schema's."""
    out = client.chat.completions.create(
        model="alpha",
        messages=ASK,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object", "schema": SCHEMAS["enum"]},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMAS["enum"])
    out = client.completions.create(
        model="beta",
        prompt="{",
        max_tokens=8,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert out.choices[0].text.startswith("{")  # an object is begun (a random model is long)


def test_streaming_with_a_schema(client):
    kw = {"model": "gamma", "messages": ASK, "max_tokens": 90, "temperature": 0}
    kw["response_format"] = json_schema("nested")
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    jsonschema.validate(json.loads(streamed), SCHEMAS["nested"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_schema_that_cannot_finish_gives_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG}}
    out = client.chat.completions.create(
        model="alpha", messages=ASK, max_tokens=6, response_format=fmt
    )
    assert out.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(out.choices[0].message.content)


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
            "response_format.json_schema.schema: the JSON schema keyword 'not'",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            'Unsupported type "nope"',
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "string", "minLength": 3, "maxLength": 1}},
            },
            "minLength 3 is greater than maxLength 1",
        ),
        ({"type": "json_schema"}, "response_format.json_schema is required"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_object", "schema": [1]}, "response_format.schema"),
    ],
)
def test_bad_schemas_get_a_400_naming_the_problem(server, fmt, message):
    for route, body in [
        ("/v1/chat/completions", {"messages": ASK}),
        ("/v1/completions", {"prompt": "Hi"}),
    ]:
        r = httpx.post(
            f"{server.url}{route}", json={"model": "alpha", "response_format": fmt, **body}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
        assert "\n" not in error["message"]


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": None}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_a_json_schema_without_its_schema_is_a_400_not_json_object(server, fmt, param):
    """OpenAI refuses type json_schema without the schema; it is not served as json_object."""
    for route, body in [
        ("/v1/chat/completions", {"messages": ASK}),
        ("/v1/completions", {"prompt": "Hi"}),
    ]:
        r = httpx.post(
            f"{server.url}{route}",
            json={"model": "alpha", "response_format": fmt, "max_tokens": 2, **body},
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (
            error["param"] == param
            and error["message"] == f"{param} is required when type is json_schema"
        )


class FailingMatcher:
    """A matcher whose grammar engine raises (an xgrammar bug) when its mask is filled."""

    def __init__(self, real):
        self.vocab_size, self.stop_ids = real.vocab_size, real.stop_ids

    def fill(self, bitmask, row: int) -> None:
        raise RuntimeError("the grammar engine broke\nat some/file.cc:12")

    def advance(self, token: int) -> bool:
        raise AssertionError("never reached: its row failed at fill")


def test_a_grammar_engine_failure_is_a_500_internal_error_not_a_400(server, monkeypatch):
    """The server's own failure on a valid request is OpenAI's 500 (type server_error, code
    internal_error, one line) on either route, streamed or not; the next request serves."""
    grammars = server.state.backend.grammars
    real = grammars.matcher
    monkeypatch.setattr(grammars, "matcher", lambda spec: FailingMatcher(real(spec)))
    ask = {
        "model": "alpha",
        "prompt": "Hi",
        "max_tokens": 8,
        "response_format": json_schema("enum"),
    }
    r = httpx.post(f"{server.url}/v1/completions", json=ask, timeout=60)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert error["message"].startswith("internal error: structured output failed: RuntimeError")
    assert "\n" not in error["message"] and "file.cc" not in error["message"]
    chat = {
        "model": "alpha",
        "messages": ASK,
        "max_tokens": 8,
        "response_format": ask["response_format"],
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
    r = httpx.post(f"{server.url}/v1/completions", json={**ask, "stream": True}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
    monkeypatch.undo()
    r = httpx.post(f"{server.url}/v1/completions", json=ask, timeout=60)
    assert r.status_code == 200, r.text


def test_tool_choice_required_and_named_give_tool_calls(client):
    kw = {"model": "alpha", "messages": ASK, "max_tokens": 80, "tools": [WEATHER, ADD]}
    for choice in ["required", {"type": "function", "function": {"name": "add"}}]:
        out = client.chat.completions.create(**kw, tool_choice=choice, temperature=0)
        first = out.choices[0]
        assert first.finish_reason == "tool_calls" and first.message.content is None
        call = first.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if choice != "required":
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    chunks = list(client.chat.completions.create(**kw, tool_choice="required", stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name in PARAMS
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS[calls[0].function.name])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tools_auto_and_none_answer_text_and_bad_choices_are_400(client):
    """The tiny model's template (SmolLM2's) declares no tools: auto answers text."""
    kw = {"model": "alpha", "messages": ASK, "max_tokens": 6, "temperature": 0}
    plain = client.chat.completions.create(**kw).choices[0]
    for choice in ["auto", "none"]:
        out = client.chat.completions.create(**kw, tools=[WEATHER], tool_choice=choice)
        assert out.choices[0].message.content == plain.message.content
        assert out.choices[0].message.tool_calls is None
    named = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError, match="'nope', which is not among the tools"):
        client.chat.completions.create(**kw, tools=[WEATHER], tool_choice=named)
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        client.chat.completions.create(
            **kw, tools=[WEATHER], tool_choice="required", response_format=json_schema("enum")
        )
    bad = copy.deepcopy(WEATHER)
    bad["function"]["parameters"]["properties"]["city"]["not"] = {}
    with pytest.raises(openai.BadRequestError, match="tools: the JSON schema keyword 'not'"):
        client.chat.completions.create(**kw, tools=[bad], tool_choice="required")


def test_lorax_client_response_format(server):
    """LoRAX's own client: response_format={"type": "json_object", "schema": ...}."""
    from lorax import Client

    lorax = Client(server.url)
    fmt = {"type": "json_object", "schema": SCHEMAS["array"]}
    out = lorax.generate("JSON:", adapter_id="beta", max_new_tokens=100, response_format=fmt)
    jsonschema.validate(json.loads(out.generated_text), SCHEMAS["array"])
    assert out.details.finish_reason == "eos_token"
    tokens = list(
        lorax.generate_stream("JSON:", adapter_id="beta", max_new_tokens=100, response_format=fmt)
    )
    assert tokens[-1].generated_text == out.generated_text
    r = httpx.post(
        f"{server.url}/generate",
        json={
            "inputs": "Hi",
            "parameters": {"response_format": {"type": "json_object", "schema": {"not": {}}}},
        },
    )
    assert r.status_code == 400 and "parameters.response_format" in r.json()["error"]["message"]


def test_without_the_grammar_engine_a_request_gets_a_501(server, monkeypatch):
    monkeypatch.setattr(structured, "unavailable", lambda: "structured output needs xgrammar: x")
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "alpha", "messages": ASK, "response_format": {"type": "json_object"}},
    )
    assert r.status_code == 501 and "needs xgrammar" in r.json()["error"]["message"]


def test_tools_reach_a_template_that_declares_them_and_a_forced_call_is_described(tokenizer):
    """A template reading `tools` renders them; for one that does not, a forced call puts the
    tools in the system message."""
    body = ChatCompletionRequest(model="m", messages=ASK, tools=[WEATHER], tool_choice="required")
    forced = structured.tool_plan(body, tokenizer)
    assert forced.mode == "forced" and not forced.render
    text = tokenizer.decode(chat_prompt_ids(tokenizer, body.messages, forced))
    assert "get_weather" in text and "You can call one of these functions" in text
    with_tools = copy.copy(tokenizer)
    with_tools.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )
    auto = structured.tool_plan(body.model_copy(update={"tool_choice": "auto"}), with_tools)
    assert auto.mode == "auto" and auto.render
    text = with_tools.decode(chat_prompt_ids(with_tools, body.messages, auto))
    assert text.startswith("TOOL get_weather") and "You can call" not in text


def test_a_chat_template_that_refuses_the_messages_is_a_400(tokenizer):
    """A template's own refusal (Mistral's: roles must alternate) is the caller's one-line
    400 naming it, not a 500."""
    strict = copy.copy(tokenizer)
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(APIError) as err:
        chat_prompt_ids(strict, ChatCompletionRequest(model="m", messages=ASK).messages)
    assert err.value.status == 400 and err.value.param == "messages"
    assert "roles must alternate" in err.value.message and "\n" not in err.value.message


def test_an_answer_is_a_tool_call_only_when_it_is_one():
    names = {"get_weather"}
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert structured.parse_call(json.dumps(call), names) == call
    assert structured.parse_call(f"<tool_call>\n{json.dumps(call)}\n</tool_call>", names) == call
    assert structured.parse_call('{"name": "other", "arguments": {}}', names) is None
    assert structured.parse_call('{"name": "get_weather", "arguments": 3}', names) is None
    assert structured.parse_call("It is sunny.", names) is None
    assert structured.might_be_call("  ") and structured.might_be_call(" {")
    assert structured.might_be_call("<tool") and structured.might_be_call("<tool_call>{")
    assert not structured.might_be_call("Sure") and not structured.might_be_call("<b>")


def test_auto_mode_streams_text_at_once_and_holds_what_may_be_a_call(tokenizer):
    """With tools on a template that renders them ("auto"), text that cannot be a call streams
    as it comes; text that may be one is held, and sent as tool_calls when it is one."""
    from lorafleet.serve.api.bridge import Stream
    from lorafleet.serve.api.choice_shapes import ChatShape
    from lorafleet.serve.api.choices import Choice
    from lorafleet.serve.sequence import TokenEvent

    plan = structured.ToolPlan("auto", [WEATHER], render=True)
    body = ChatCompletionRequest(model="m", messages=ASK)

    def run(parts: list[str]):
        shape = ChatShape("id", 0, "m", body, tokenizer, plan)
        choice = Choice(0, [1], Stream(0, 1, None, None))
        sent = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            event = TokenEvent(0, i, part, last, "stop" if last else None)
            choice.events.append(event)
            choice.stream.finish_reason = event.finish_reason
            sent.append([c.choices[0] for c in shape.on_event(choice, event)])
        return sent, shape.final([choice]).choices[0]

    sent, final = run(["Sure", ", it is", " sunny."])
    assert [[d.delta.get("content") for d in step] for step in sent] == [
        ["Sure"],
        [", it is"],
        [" sunny.", None],
    ]
    assert final.finish_reason == "stop" and final.message.content == "Sure, it is sunny."
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    sent, final = run([" {", call[1:30], call[30:]])
    assert sent[0] == [] and sent[1] == []  # held: it may be a call
    calls = sent[2][0].delta["tool_calls"]
    assert (
        calls[0]["function"]["name"] == "get_weather" and sent[2][1].finish_reason == "tool_calls"
    )
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert final.finish_reason == "tool_calls" and final.message.content is None
    sent, final = run(["{", '"a": 1}'])  # JSON, but not a call: released as text at the end
    assert [d.delta.get("content") for d in sent[1]] == ["{", '"a": 1}', None]
    assert final.message.content == '{"a": 1}' and final.finish_reason == "stop"
