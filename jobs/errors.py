"""Errors a client can cause (or must be told about), each with an HTTP status and a machine-readable code.

The API renders every one as `{"error": {"code", "message", "param"}}`; the domain raises them so api routes
stay thin.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "invalid_request"
    retry_after: int | None = None  # seconds, sent as `Retry-After`

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class Invalid(ServiceError):
    status = 422
    code = "invalid_request"


class TooLarge(ServiceError):
    status = 413
    code = "file_too_large"


class Unavailable(ServiceError):
    status = 503
    code = "service_unavailable"


class TooMany(ServiceError):
    """Over a team's quota or rate limit: the code names the limit, `Retry-After` says when to try again."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Gone(ServiceError):
    status = 410
    code = "gone"
