"""JSON errors of the HTTP API: every error body is ``{"error": {"code", "message"}}``.

Status codes: 401 missing or wrong bearer token, 404 unknown run or path, 422 invalid
spec or request (the spec's messages are the CLI's lines), 503 Redis unreachable or
answering with an error (never a 500), 504 a ``wait`` that passed its timeout.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis import exceptions as redis_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from oao_common.errors import RedisUnavailable
from oao_common.log import get_logger

log = get_logger(component="api")


class ErrorDetail(BaseModel):
    code: str
    message: str
    problems: list[str] | None = None


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class APIError(Exception):
    """An error answer: HTTP ``status``, a stable machine ``code``, a human ``message``,
    and for a bad spec the list of ``problems`` (one per line, as the CLI prints them)."""

    def __init__(self, status: int, code: str, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems


def error_response(
    status: int, code: str, message: str, problems: list[str] | None = None, headers: Any = None
) -> JSONResponse:
    detail: dict[str, Any] = {"code": code, "message": message}
    if problems is not None:
        detail["problems"] = problems
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


#: Documented on every route (the OpenAPI schema lists them; schemathesis checks them).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    422: {"model": ErrorBody, "description": "Invalid request or spec"},
    503: {"model": ErrorBody, "description": "Redis unavailable"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such run"}}

REDIS_ERRORS = (redis_exc.RedisError, RedisUnavailable, ConnectionError, TimeoutError)


def install_handlers(app: FastAPI) -> None:
    """Map APIError, request validation, HTTP errors and Redis errors to JSON errors."""

    async def api_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, APIError)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(e.status, e.code, e.message, e.problems, headers)

    async def invalid(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(problems)[:2000], problems[:50])

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(e.status_code, code, str(e.detail), headers=getattr(e, "headers", None))

    async def redis_down(_: Request, e: Exception) -> JSONResponse:
        log.warning("redis_unavailable", error=f"{type(e).__name__}: {e}")
        return error_response(503, "redis_unavailable", f"Redis is unavailable: {type(e).__name__}")

    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.error("api_internal_error", error=f"{type(e).__name__}: {e}")
        return error_response(500, "internal", "internal error (logged by the API server)")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, internal)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for exc in REDIS_ERRORS:
        app.add_exception_handler(exc, redis_down)
