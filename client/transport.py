"""HTTP with the service's conventions: the API key, retries with exponential backoff on 429 / 503 and on
connection errors (honouring `Retry-After`), and error responses raised as `errors.APIError` subclasses.

A request is retried after a connection error only when it is safe to send twice: reads, idempotent actions, and
any request that never reached the server (connect errors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from langadapt.client.errors import ConnectionFailed, error_from_response

RETRY_STATUSES = frozenset({429, 502, 503, 504})
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Backoff:
    """Delays 0.5, 1, 2, 4 ... s (capped), `retries` times; a server's `Retry-After` wins when it is longer."""

    def __init__(self, retries: int, base_s: float = 0.5, cap_s: float = 8.0) -> None:
        self.retries, self.base_s, self.cap_s = retries, base_s, cap_s
        self.attempt = 0

    def wait(self, retry_after: str | None = None) -> bool:
        """Sleep before the next try; False when the retries are used up."""
        if self.attempt >= self.retries:
            return False
        delay = min(self.base_s * 2**self.attempt, self.cap_s)
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        self.attempt += 1
        time.sleep(delay)
        return True

    def reset(self) -> None:
        self.attempt = 0


class Transport:
    def __init__(self, base_url: str, api_key: str, *, timeout: float, retries: int) -> None:
        self.retries = retries
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "langadapt-client"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        files: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call, retried; raises the error's exception class. `files` is a factory (a retry re-opens)."""
        safe = method in ("GET", "HEAD", "DELETE") if idempotent is None else idempotent
        backoff = Backoff(self.retries)
        while True:
            try:
                response = self.http.request(method, path, files=files() if files else None, **kwargs)
            except httpx.TransportError as exc:
                if (safe or isinstance(exc, NEVER_SENT)) and backoff.wait():
                    continue
                raise ConnectionFailed(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            retryable = response.status_code in RETRY_STATUSES and (safe or response.status_code == 429)
            if retryable and backoff.wait(response.headers.get("retry-after")):
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed GET, error statuses raised (after their body is read); no retry here: callers resume."""
        with self.http.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            yield response
