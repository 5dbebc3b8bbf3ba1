"""Typed API errors and the one function that turns any failure into the error envelope.

Every error response is `{"error": {"type", "message", "param"}}` with the right status code.
Handlers raise `ApiError` subclasses; validation errors name the field that is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmserve.wire.errors import ErrorBody, ErrorDetail

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 500
    type = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers


class BadRequest(ApiError):
    status, type = 400, "invalid_request"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"


class Forbidden(ApiError):
    status, type = 403, "forbidden"


class NotFound(ApiError):
    status, type = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class UnprocessableEntity(ApiError):
    status, type = 422, "invalid_request"


class QueueFull(ApiError):
    status, type = 429, "overloaded"


class RateLimited(ApiError):
    status, type = 429, "rate_limited"


class TooManyItemsInFlight(ApiError):
    status, type = 429, "too_many_items_in_flight"


class Unavailable(ApiError):
    status, type = 503, "unavailable"


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(type=type_, message=message, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# Parts of a pydantic error location that name a union member, not a field.
_NOT_FIELDS = {
    "str",
    "int",
    "float",
    "bool",
    "dict",
    "list",
    "none",
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "text",
}


def field_path(loc: Sequence[int | str]) -> str:
    """The field a pydantic error location names, without union-member parts.

    ("body", "items", 0, "messages", 1, "user", "content", "str") -> items.0.messages.1.content
    """
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text = str(part)
        if isinstance(part, str) and ("[" in text or text in _NOT_FIELDS):
            continue
        if parts and parts[-1] == text and not isinstance(part, int):
            continue  # image_url (union tag) followed by image_url (field)
        parts.append(text)
    return ".".join(parts)


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    status, detail = validation_error(errors)
    return error_response(status, detail.type, detail.message, detail.param)


def validation_error(errors: Sequence[Any]) -> tuple[int, ErrorDetail]:
    """The status and error body of a request that failed validation: 400 for a body that is
    not JSON, else 422 naming the (deepest) field that is wrong."""
    if errors and errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        message = f"request body is not valid JSON: {ctx.get('error', 'parse error')}"
        return 400, ErrorDetail(type="invalid_json", message=message)
    by_field: dict[str, list[str]] = {}
    for err in errors:
        path = field_path(err["loc"])
        discriminator = (err.get("ctx") or {}).get("discriminator")
        if err.get("type") in ("union_tag_invalid", "union_tag_not_found") and discriminator:
            path = ".".join(filter(None, [path, discriminator.strip("'")]))
        messages = by_field.setdefault(path or "body", [])
        text = err["msg"] + _got(err.get("input"))
        if text not in messages:
            messages.append(text)
    # A union (str | list of parts) fails once per member; the deepest path is the precise one.
    fields = sorted(by_field, key=lambda field: -field.count("."))
    message = "; ".join(f"{field}: {' or '.join(by_field[field])}" for field in fields[:5])
    return 422, ErrorDetail(type="invalid_request", message=message, param=fields[0])


def _got(value: Any) -> str:
    """The offending value, when it is short enough to quote."""
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 40):
        return f" (got {value!r})"
    return ""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, kind, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")
