"""Schemathesis fuzzes every operation of /openapi.json: no input may produce a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = 25  # per operation


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
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            _check(case)

        fuzz()
