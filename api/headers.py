"""A cap on the size of a request's headers (431 beyond it), before any route, key check or hash sees them."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from langadapt.api.errors import error_response


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_bytes:
            response = error_response(
                431, "headers_too_large", f"the request headers exceed {self.max_bytes} bytes", "headers"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
