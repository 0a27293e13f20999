"""Webhook signatures: `Langadapt-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.

Receivers recompute the HMAC over the raw body with the webhook's secret and refuse a timestamp older than the
replay window (`verify_signature`, also exported by `langadapt.client`). Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Langadapt-Signature"
REPLAY_WINDOW_S = 300


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance_s: float = REPLAY_WINDOW_S, now: float | None = None
) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within `tolerance_s` of now."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp = parts.get("t", "")
    if not timestamp.isdigit() or "v1" not in parts:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, int(timestamp)), f"t={timestamp},v1={parts['v1']}")
