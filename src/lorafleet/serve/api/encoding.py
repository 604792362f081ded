"""Bad bytes in a JSON body (invalid UTF-8, lone surrogates) answer 400 before any route runs."""

from __future__ import annotations

import json
import re

from lorafleet.serve.api.errors import APIError

# A \uD800-\uDFFF escape: the only way JSON text in valid UTF-8 can carry a lone surrogate.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
NO_BODY = {"GET", "HEAD", "OPTIONS"}


def body_problem(body: bytes) -> APIError | None:
    """The 400 for a body that is not valid UTF-8 or holds a lone surrogate; None when clean."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return APIError(
            400,
            f"the request body is not valid UTF-8 (byte {exc.start})",
            code="invalid_encoding",
            param="body",
        )
    if not SURROGATE_ESCAPE.search(body):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # not JSON: the route's own parsing answers that
    where = _surrogate_at(value, ())
    if where is None:
        return None  # paired surrogates (one character outside the BMP) are fine
    param = ".".join(where) or "body"
    return APIError(
        400,
        f"{param}: the string holds a lone UTF-16 surrogate (not valid Unicode)",
        code="invalid_encoding",
        param=param,
    )


def _surrogate_at(value, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path of the first string (key or value) that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return None
    for key, item in items:
        if not _encodable(key):
            return path  # the bad key's own text cannot be named
        found = _surrogate_at(item, (*path, key))
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_json(scope) -> bool:
    # FastAPI reads a body as JSON when its content-type says json or is absent.
    headers = dict(scope.get("headers") or [])
    kind = headers.get(b"content-type", b"").decode("latin-1").lower()
    return not kind or "json" in kind


class BadBytesGuard:
    """ASGI middleware: reads a JSON body once, answers 400 for bad bytes, else replays it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in NO_BODY or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks, message = [], {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        problem = body_problem(body)
        if problem is not None:
            await problem.response()(scope, receive, send)
            return
        replayed = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([replayed], receive), send)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay
