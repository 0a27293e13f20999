"""One error shape for every 4xx/5xx: `{"error": {"code", "message", "param"}}`; never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from langadapt.core.adaptation.spec import error_field
from langadapt.jobs.errors import ServiceError
from langadapt.jobs.storage import StorageUnavailable

log = logging.getLogger("langadapt.api")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def error_response(
    status: int, code: str, message: str, param: str | None = None, *, retry_after: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"code": code, "message": message, "param": param}}, status, headers)


def _param(error: dict) -> str:
    """The field an error is about, without FastAPI's location prefix (`body.cpt.warmup_steps` -> `cpt.warmup_steps`;
    a `SpecConflict` adds the field it names)."""
    loc = tuple(error.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        return error_field({**error, "loc": loc[1:]}) or str(loc[0])
    return error_field(error) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, retry_after=exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = str(first["msg"]).removeprefix("Value error, ")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(422, "invalid_request", message, _param(first))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(503, "database_unavailable", "the database is unavailable; retry shortly")

    @app.exception_handler(DataError)
    async def unstorable_value(_: Request, exc: DataError) -> JSONResponse:
        # Values pydantic accepts but the database cannot hold: NUL characters, integers beyond 64 bits.
        return error_response(
            422,
            "invalid_request",
            "a value in the request cannot be stored or compared (NUL characters, or a number out of range)",
        )

    @app.exception_handler(DBAPIError)
    async def database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(503, "database_unavailable", "the database connection was lost; retry shortly")
        log.exception("database error")
        return error_response(500, "internal_error", "internal server error")

    @app.exception_handler(StorageUnavailable)
    async def storage_down(_: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return error_response(503, "storage_unavailable", "artifact storage is unavailable; retry shortly")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
