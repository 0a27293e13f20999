"""Webhooks: a team's URLs told about its jobs, signed; each delivery's attempts are readable (the delivery log).

Deliveries are POSTs of `{"id", "type", "created_at", "data": {"job": {...}, ...}}` with the headers
`Langadapt-Event`, `Langadapt-Delivery` and `Langadapt-Signature: t=<unix s>,v1=<hex>`, where the hex is
HMAC-SHA256 with the webhook's secret over `"<t>." + body`; reject timestamps older than 5 minutes (replays).
`langadapt.client.verify_signature` does both checks.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from langadapt.api.deps import CurrentTeam, SessionDep, SettingsDep
from langadapt.api.schemas import (
    ERROR_RESPONSES,
    WebhookCreated,
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
    WebhookPublic,
    WebhookRequest,
    WebhooksPublic,
)
from langadapt.jobs import webhooks
from langadapt.jobs.models import Webhook

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERROR_RESPONSES)


def _public(row: Webhook) -> WebhookPublic:
    return WebhookPublic(id=row.id, url=row.url, events=row.events, created_at=row.created_at)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated)
def create_webhook(
    body: WebhookRequest, team: CurrentTeam, session: SessionDep, settings: SettingsDep
) -> WebhookCreated:
    """Register a URL for job events. The answer holds the signing secret, shown this once. URLs on private,
    loopback or link-local networks are refused (422 `unsafe_webhook_url`) unless the server allows them."""
    row = webhooks.create_webhook(session, settings, team, body.url, list(body.events))
    return WebhookCreated(**_public(row).model_dump(), secret=row.secret)


@router.get("", response_model=WebhooksPublic)
def list_webhooks(team: CurrentTeam, session: SessionDep) -> WebhooksPublic:
    return WebhooksPublic(data=[_public(row) for row in webhooks.list_webhooks(session, team)])


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_webhook(webhook_id: str, team: CurrentTeam, session: SessionDep) -> Response:
    webhooks.delete_webhook(session, team, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveriesPublic)
def list_deliveries(webhook_id: str, team: CurrentTeam, session: SessionDep) -> WebhookDeliveriesPublic:
    """The latest 100 deliveries, newest first: status, attempts, the receiver's last answer or error."""
    hook = webhooks.get_webhook(session, team, webhook_id)
    rows = webhooks.deliveries(session, hook)
    return WebhookDeliveriesPublic(
        data=[
            WebhookDeliveryPublic(
                id=row.id,
                event=row.event,
                job_id=row.job_id,
                status=row.status,  # type: ignore[arg-type]
                attempts=row.attempts,
                response_status=row.response_status,
                error=row.error,
                created_at=row.created_at,
                next_attempt_at=row.next_attempt_at,
                delivered_at=row.delivered_at,
            )
            for row in rows
        ]
    )
