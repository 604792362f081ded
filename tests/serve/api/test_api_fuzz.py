"""Schemathesis fuzzes every operation of /openapi.json: no input (bad bytes too) gives a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = 25  # per operation
BAD_EXAMPLES = 8  # per JSON operation, each sent twice (escaped surrogate, raw bad bytes)
LONE = "\ud800"


def _check(case) -> None:
    response = case.call(timeout=60)
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    kind = response.headers.get("content-type") or ""
    kind = kind[0] if isinstance(kind, list) else kind  # schemathesis keeps header lists
    if response.status_code >= 400 and kind.startswith("application/json"):
        error = response.json().get("error")
        assert error and set(error) == {"message", "type", "param", "code"}, response.text[:300]


def test_no_input_gives_a_server_error(server):
    # The Python API, not schemathesis' pytest plugin (which lags pytest's internals).
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8  # models, completions, chat, generate(_stream), admin, health...
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            _check(case)

        fuzz()


def _bad_strings(value):
    """`value` with a lone surrogate put into every string (keys too); a string when none."""
    if isinstance(value, str):
        return value + LONE
    if isinstance(value, dict):
        return {k + LONE: _bad_strings(v) for k, v in value.items()} or {"x": LONE}
    if isinstance(value, list):
        return [_bad_strings(v) for v in value] or [LONE]
    return [value, LONE]


def _check_bad_bytes(url: str, method: str, content: bytes) -> None:
    response = httpx.request(
        method, url, content=content, timeout=60, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, f"{method} {url}: {response.status_code} {content[:200]!r}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_encoding"


def test_bad_bytes_in_any_json_body_answer_400(server):
    # Each generated body with every string made invalid Unicode: as a JSON escape (\ud800) and
    # as raw bytes that are not UTF-8 (the surrogate's own encoding, ED A0 80).
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    json_ops = [
        op
        for op in operations
        if op.method.upper() != "GET" and any("json" in body.media_type for body in op.body)
    ]
    assert len(json_ops) >= 4  # completions, chat, generate, generate_stream, admin
    for operation in json_ops:

        @given(case=operation.as_strategy(media_type="application/json"))
        @settings(
            max_examples=BAD_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            bad = _bad_strings(case.body)
            url = server.url + case.formatted_path
            _check_bad_bytes(url, case.method, json.dumps(bad).encode())
            raw = json.dumps(bad, ensure_ascii=False).encode("utf-8", "surrogatepass")
            _check_bad_bytes(url, case.method, raw)

        fuzz()


BAD_BODIES = {
    "latin-1 byte": b'{"model": "alpha", "prompt": "caf\xe9", "max_tokens": 2}',
    "cut multibyte": b'{"model": "alpha", "prompt": "\xe2\x82", "max_tokens": 2}',
    "lone high surrogate": b'{"model": "alpha", "prompt": "a\\ud800b", "max_tokens": 2}',
    "lone low surrogate in stop": b'{"model": "alpha", "prompt": "a", "stop": ["\\udc00"]}',
    "surrogate in a key": b'{"model": "alpha", "prompt": "a", "\\udfff": 1}',
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_bad_bytes_named_cases(server, body):
    _check_bad_bytes(server.url + "/v1/completions", "POST", body)
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi" + LONE}]}
    _check_bad_bytes(server.url + "/v1/chat/completions", "POST", json.dumps(chat).encode())


def test_paired_surrogates_are_one_character_and_fine(server):
    body = b'{"model": "alpha", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'  # one emoji
    response = httpx.post(
        server.url + "/v1/completions",
        content=body,
        timeout=60,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
