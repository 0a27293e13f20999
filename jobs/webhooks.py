"""Webhooks: a team's URLs told about its jobs (`job.succeeded`, `job.failed`, `job.cancelled`,
`job.stage_completed`, `job.retrying`).

An event is written as a delivery row in the transaction that changes the job (an outbox: no event is lost when
the sender is down), and the maintenance worker sends due deliveries (`deliver_due`, on the beat schedule):
signed (`signatures.py`), retried with exponential backoff until the receiver answers 2xx or the attempts run out.
Every attempt updates the row: the delivery log a team reads.

URLs are refused when they point at private, loopback, link-local or otherwise non-public addresses (SSRF), checked
when registered and again before each send (DNS may change), unless `webhooks_allow_private` is set.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from langadapt.jobs.errors import Invalid, NotFound
from langadapt.jobs.models import Job, Team, Webhook, WebhookDelivery, utcnow
from langadapt.jobs.settings import Settings
from langadapt.jobs.signatures import HEADER, sign

log = logging.getLogger("langadapt.jobs")

DELIVERY_BATCH = 50
TIMEOUT_S = 10.0


class UnsafeUrl(Invalid):
    code = "unsafe_webhook_url"


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse non-http(s) URLs and hosts that resolve to a non-public address (unless allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("a webhook URL must be http(s)://host/...", param="url")
    if allow_private:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError) as exc:
        raise UnsafeUrl(f"cannot resolve {parts.hostname!r}: {exc}", param="url") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise UnsafeUrl(f"{parts.hostname} resolves to a non-public address ({ip})", param="url")


def create_webhook(session: Session, settings: Settings, team: Team, url: str, events: list[str]) -> Webhook:
    check_url(url, allow_private=settings.webhooks_allow_private)
    secret = "whsec_" + secrets.token_urlsafe(32)
    webhook = Webhook(team_id=team.id, url=url, events=list(dict.fromkeys(events)), secret=secret)
    session.add(webhook)
    session.commit()
    return webhook


def list_webhooks(session: Session, team: Team) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.team_id == team.id).order_by(Webhook.id)))


def get_webhook(session: Session, team: Team, webhook_id: str) -> Webhook:
    webhook = session.get(Webhook, webhook_id)
    if webhook is None or webhook.team_id != team.id:
        raise NotFound(f"no webhook {webhook_id!r}", code="webhook_not_found", param="webhook_id")
    return webhook


def delete_webhook(session: Session, team: Team, webhook_id: str) -> None:
    session.delete(get_webhook(session, team, webhook_id))
    session.commit()


def deliveries(session: Session, webhook: Webhook, *, limit: int = 100) -> list[WebhookDelivery]:
    """The newest deliveries first."""
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id)
    return list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))


def notify(session: Session, job_id: str, event: str, data: dict[str, Any] | None = None) -> None:
    """Queue `event` for every webhook of the job's team that wants it; the caller commits."""
    job = session.get(Job, job_id, populate_existing=True)  # the status an UPDATE just set
    if job is None:
        return
    team_hooks = session.scalars(select(Webhook).where(Webhook.team_id == job.team_id).order_by(Webhook.id))
    hooks = [hook for hook in team_hooks if event in hook.events]
    if not hooks:
        return
    payload = {"type": event, "created_at": utcnow().isoformat(), "data": {"job": _job_summary(job), **(data or {})}}
    for hook in hooks:
        session.add(WebhookDelivery(webhook_id=hook.id, event=event, job_id=job.id, payload=payload))


def _job_summary(job: Job) -> dict[str, Any]:
    error = None
    if job.error_code is not None:
        error = {"code": job.error_code, "message": job.error_message, "stage": job.error_stage, "kind": job.error_kind}
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "attempt": job.attempt,
        "labels": {label.key: label.value for label in job.labels},
        "error": error,
    }


def deliver_due(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Send the deliveries whose time has come (one attempt each); returns how many were attempted."""
    with sessions() as session:
        due = list(
            session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                .order_by(WebhookDelivery.id)
                .limit(DELIVERY_BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as http:
            for delivery in due:
                _attempt(session, http, settings, delivery)
        session.commit()
    return len(due)


def _attempt(session: Session, http: httpx.Client, settings: Settings, delivery: WebhookDelivery) -> None:
    webhook = session.get(Webhook, delivery.webhook_id)
    assert webhook is not None  # deliveries are deleted with their webhook
    body = json.dumps({"id": delivery.id, **delivery.payload}, separators=(",", ":")).encode()
    delivery.attempts += 1
    try:
        check_url(webhook.url, allow_private=settings.webhooks_allow_private)
        response = http.post(
            webhook.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "Langadapt-Event": delivery.event,
                "Langadapt-Delivery": str(delivery.id),
                HEADER: sign(webhook.secret, body, int(time.time())),
            },
        )
        delivery.response_status, delivery.error = response.status_code, None
        ok = response.is_success
        if not ok:
            delivery.error = f"HTTP {response.status_code}: {response.text[:200]}"
    except (httpx.HTTPError, Invalid) as exc:
        ok, delivery.response_status = False, None
        delivery.error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"[:1000]
    now = utcnow()
    if ok:
        delivery.status, delivery.delivered_at, delivery.next_attempt_at = "succeeded", now, None
    elif delivery.attempts >= settings.webhook_max_attempts:
        delivery.status, delivery.next_attempt_at = "failed", None
        log.warning("webhook delivery %s failed for good: %s", delivery.id, delivery.error)
    else:
        delay = min(settings.webhook_backoff_s * 2 ** (delivery.attempts - 1), 3600.0)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
