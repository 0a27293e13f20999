"""The service's errors as exceptions: one class per error code (`{"error": {code, message, param}}`), grouped
under one class per HTTP status, so callers catch as narrowly as they like:

    try:
        client.jobs.cancel(job_id)
    except JobNotCancellable:   # this code only
        ...
    except NotFoundError:       # any 404
        ...
A code this client does not know yet raises its status's class (or `APIError`).
"""

from __future__ import annotations

import httpx


class LangadaptError(Exception):
    """Every error the client raises."""


class ConnectionFailed(LangadaptError):
    """The service could not be reached (after the retries)."""


class ChecksumMismatch(LangadaptError):
    """A downloaded artifact's sha256 differs from the listing's: the partial file was deleted."""


class APIError(LangadaptError):
    status: int = 0
    code: str = "api_error"

    def __init__(self, message: str, *, status: int, code: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (param: {param})" if param else ""))
        self.message, self.status, self.code, self.param = message, status, code, param


class BadRequest(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401


class NotFoundError(APIError):
    status = 404


class ConflictError(APIError):
    status = 409


class PayloadTooLarge(APIError):
    status = 413


class InvalidRequest(APIError):
    status = 422
    code = "invalid_request"


class RateLimited(APIError):
    status = 429


class ServerError(APIError):
    status = 500
    code = "internal_error"


class ServiceUnavailable(APIError):
    status = 503
    code = "service_unavailable"


class InvalidApiKey(AuthenticationError):
    code = "invalid_api_key"


class JobNotFound(NotFoundError):
    code = "job_not_found"


class FileNotFound(NotFoundError):
    code = "file_not_found"


class ArtifactNotFound(NotFoundError):
    code = "artifact_not_found"


class WebhookNotFound(NotFoundError):
    code = "webhook_not_found"


class IdempotencyKeyReused(ConflictError):
    code = "idempotency_key_reused"


class JobNotCancellable(ConflictError):
    code = "job_not_cancellable"


class JobNotRetryable(ConflictError):
    code = "job_not_retryable"


class FileTooLarge(PayloadTooLarge):
    code = "file_too_large"


class InvalidModel(InvalidRequest):
    code = "invalid_model"


class TaskUnavailable(InvalidRequest):
    code = "task_unavailable"


class UnsupportedFileType(InvalidRequest):
    code = "unsupported_file_type"


class EmptyFile(InvalidRequest):
    code = "empty_file"


class EmptyCorpus(InvalidRequest):
    code = "empty_corpus"


class InvalidArtifactName(InvalidRequest):
    code = "invalid_artifact_name"


class UnsafeWebhookUrl(InvalidRequest):
    code = "unsafe_webhook_url"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


def _leaves(cls: type[APIError]) -> list[type[APIError]]:
    return [leaf for sub in cls.__subclasses__() for leaf in [sub, *_leaves(sub)]]


BY_STATUS: dict[int, type[APIError]] = {cls.status: cls for cls in APIError.__subclasses__()}
BY_CODE: dict[str, type[APIError]] = {cls.code: cls for cls in _leaves(APIError) if cls.code != "api_error"}


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response: by code, else by status, else `APIError`."""
    try:
        body = response.json()["error"]
        code, message, param = str(body["code"]), str(body["message"]), body.get("param")
    except (ValueError, KeyError, TypeError):
        code, message, param = "http_error", response.text[:500] or response.reason_phrase, None
    cls = BY_CODE.get(code)
    if cls is None or cls.status != response.status_code:
        cls = BY_STATUS.get(response.status_code, APIError)
    return cls(message, status=response.status_code, code=code, param=param)
