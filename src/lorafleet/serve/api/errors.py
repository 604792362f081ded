"""OpenAI-shaped HTTP errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered in OpenAI's shape; raise it anywhere in a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        kind = TYPES.get(self.status, fallback)
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(name: str, hint: str = "") -> APIError:
    # The same answer for a missing model and another tenant's private one (no existence leak);
    # `hint` (e.g. the flag that loads hub ids) ends the message in parentheses.
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it."
        + (f" ({hint})" if hint else ""),
        code="model_not_found",
        param="model",
    )


def _where(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def on_api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's 422 becomes OpenAI's 400, one line naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    where = _where(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        msg, where = "the request body is not valid JSON", "body"
    err = APIError(400, f"{where}: {msg}", code="invalid_request", param=where)
    return err.response()


async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = APIError(exc.status_code, str(exc.detail), code=None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers or {})


async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # Last resort: a bug must still answer in the contract's shape, never an HTML traceback.
    err = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
    return err.response()


def install(app) -> None:
    """Answer every error `app` raises in OpenAI's shape (the body's bad bytes are
    encoding.BadBytesGuard's, a middleware the app adds beside this)."""
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
