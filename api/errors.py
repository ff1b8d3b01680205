"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP
status the openai client maps to its exception classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 409 ConflictError, 413 APIStatusError, 500
InternalServerError)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmjobs.jobs.api_errors import (
    BatchStateError,
    InvalidRequestError,
    NoSuchObjectError,
    UploadTooLargeError,
)
from lmjobs.jobs.errors import LmjobsError
from lmjobs.jobs.settings import mask_secrets

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as is: status, message, OpenAI type, param, code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def from_service(exc: LmjobsError) -> ApiError:
    """The HTTP answer to a service's user-facing error."""
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, NoSuchObjectError):
        return ApiError(404, str(exc), code="not_found")
    if isinstance(exc, UploadTooLargeError):
        return ApiError(413, str(exc), param="file", code="file_too_large")
    if isinstance(exc, BatchStateError):
        return ApiError(409, str(exc), code="invalid_state")
    return ApiError(400, str(exc))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(LmjobsError)
    async def _service(_: Request, exc: LmjobsError) -> JSONResponse:
        e = from_service(exc)
        return error_response(e.status, e.message, type=e.type, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            return error_response(
                400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            )
        if first.get("type") == "missing":
            return error_response(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            )
        msg = str(first.get("msg", "invalid request"))
        return error_response(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, mask_secrets(str(exc))[:2000])
        return error_response(500, "internal server error", type="server_error")
