"""bench serve's SSE reader, shared by the lorafleet and llama-server clients."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.bench.serve import sse_events
from lorafleet.errors import LorafleetError


class _Response:
    def __init__(self, lines: list[str], status: int = 200):
        self.status_code, self._lines = status, lines

    async def aiter_lines(self):
        for line in self._lines:
            yield line

    async def aread(self) -> bytes:
        return "\n".join(self._lines).encode()


def _events(resp, who="peer") -> list[dict]:
    async def collect():
        return [e async for e in sse_events(resp, who)]

    return asyncio.run(collect())


def test_data_lines_are_events_and_done_or_other_lines_are_skipped():
    lines = [": ping", 'data: {"tokens": [1, 2]}', "", 'data: {"tokens": [3]}', "data: [DONE]"]
    assert _events(_Response(lines)) == [{"tokens": [1, 2]}, {"tokens": [3]}]


def test_http_errors_and_error_events_raise_one_error_naming_the_server():
    with pytest.raises(LorafleetError, match="llama-server HTTP 500"):
        _events(_Response(["boom"], status=500), "llama-server")
    with pytest.raises(LorafleetError, match="lorafleet stream error: .*bad"):
        _events(_Response(['data: {"error": {"message": "bad"}}']), "lorafleet")
