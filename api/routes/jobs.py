from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from langadapt.api.deps import CurrentTeam, ServicesDep, SessionDep, SettingsDep, StoreDep
from langadapt.api.routes.pagination import Limit, parse_labels
from langadapt.api.schemas import (
    ERROR_RESPONSES,
    ErrorBody,
    EstimatePublic,
    EventPublic,
    EventsPublic,
    JobPublic,
    JobsPublic,
    PayoffEstimate,
    StageEstimate,
)
from langadapt.api.streams import EventWatcher, GatedStreamingResponse, StreamGate
from langadapt.core.adaptation.config import INT64_MAX
from langadapt.jobs import retention, service
from langadapt.jobs.errors import Invalid
from langadapt.jobs.estimate import estimate_stages
from langadapt.jobs.models import JobStatus, Team
from langadapt.jobs.payoff import measure_payoff
from langadapt.jobs.queue import dispatch
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest
from langadapt.jobs.storage import ArtifactStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

SSE_KEEPALIVE_S = 15.0


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic | EstimatePublic,
    responses={200: {"model": EstimatePublic, "description": "dry run: the estimate; nothing was queued"}},
)
def create_job(
    body: JobRequest,
    response: Response,
    team: CurrentTeam,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    services: ServicesDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    dry_run: Annotated[bool, Query(description="validate and estimate only: no job, nothing queued")] = False,
) -> JobPublic | EstimatePublic:
    """Submit an adaptation job. With an `Idempotency-Key`, a repeated request returns the original job
    (header `Idempotent-Replayed: true`); the same key with a different body is a 409. With `dry_run=true` the
    answer (200) is an estimate: tokens, steps and GPU minutes per stage, artifact bytes, vocabulary payoff."""
    if dry_run:
        response.status_code = status.HTTP_200_OK
        return _estimate(session, store, settings, team, body)
    job, created = service.create_job(
        session=session, store=store, settings=settings, team=team, request=body, idempotency_key=idempotency_key
    )
    if created:
        dispatch(session, services.celery, job.id, services.settings)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.of(job)


def _estimate(
    session: Session, store: ArtifactStore, settings: Settings, team: Team, body: JobRequest
) -> EstimatePublic:
    service.validate_request(session=session, store=store, settings=settings, team=team, request=body)
    payoff = measure_payoff(session, store, settings, body)
    per_token = payoff.proposed_chars_per_token if payoff is not None else None
    stages, artifact_bytes = estimate_stages(session, settings, body, chars_per_token=per_token)
    minutes = [stage.gpu_minutes for stage in stages]
    return EstimatePublic(
        request=body.model_dump(mode="json"),
        stages=[StageEstimate(**asdict(stage)) for stage in stages],
        gpu_minutes=None if None in minutes else round(sum(m for m in minutes if m is not None), 2),
        artifact_bytes=artifact_bytes,
        payoff=PayoffEstimate(**asdict(payoff)) if payoff is not None else None,
    )


@router.get("", response_model=JobsPublic)
def list_jobs(
    team: CurrentTeam,
    session: SessionDep,
    limit: Limit = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
    status: Annotated[JobStatus | None, Query()] = None,
    label: Annotated[list[str], Query(description="key:value, repeatable")] = [],  # noqa: B006
) -> JobsPublic:
    rows, cursor = service.list_jobs(session, team, after=after, limit=limit, status=status, labels=parse_labels(label))
    return JobsPublic(data=[JobPublic.of(job) for job in rows], next=cursor)


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: str, team: CurrentTeam, session: SessionDep) -> JobPublic:
    return JobPublic.of(service.get_job(session, team, job_id))


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_job(job_id: str, team: CurrentTeam, session: SessionDep, store: StoreDep) -> Response:
    """Delete a finished job with everything it stored (artifacts, checkpoints, events, scores). 409
    `job_not_finished` while it is queued or running; 503 `storage_unavailable` (job kept) when storage fails."""
    retention.delete_job(session, store, team, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, team: CurrentTeam, session: SessionDep) -> JobPublic:
    """Cooperative and idempotent: a queued job never starts; a running one stops at its next step."""
    return JobPublic.of(service.cancel_job(session, team, job_id))


@router.post("/{job_id}/retry", response_model=JobPublic)
def retry_job(job_id: str, team: CurrentTeam, session: SessionDep, services: ServicesDep) -> JobPublic:
    """Re-queue a failed or cancelled job; it resumes from its last completed stage / checkpoint."""
    job = service.retry_job(session, team, job_id)
    dispatch(session, services.celery, job.id, services.settings)
    return JobPublic.of(job)


@router.get(
    "/{job_id}/events",
    response_model=EventsPublic,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON page, or SSE with that Accept"},
        429: {"model": ErrorBody, "description": "too many open event streams (see Retry-After)"},
    },
)
def list_events(
    job_id: str,
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    limit: Limit = 100,
    after: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> EventsPublic | StreamingResponse:
    """Events oldest first; with `Accept: text/event-stream` a live stream that ends when the job does (the
    `Last-Event-ID` header, when sent, takes the place of `after`)."""
    job = service.get_job(session, team, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = _event_cursor(last_event_id) if last_event_id else after
        gate: StreamGate = request.app.state.stream_gate
        gate.open(team.id)
        return GatedStreamingResponse(
            _stream(request.app.state.event_watcher, job.id, start),
            release=lambda: gate.close(team.id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows, cursor = service.list_events(session, job, after=after, limit=limit)
    return EventsPublic(data=[EventPublic.of(event) for event in rows], next=cursor)


def _event_cursor(value: str) -> int:
    if not value.isdigit() or int(value) > INT64_MAX:
        raise Invalid("Last-Event-ID must be an event id (a non-negative integer)", param="Last-Event-ID")
    return int(value)


async def _stream(watcher: EventWatcher, job_id: str, after: int | None) -> AsyncIterator[str]:
    """Writes out what the watcher reads for this stream; ends with the job once every event is sent."""
    async with watcher.watch(job_id, after) as subscription:
        while True:
            subscription.wake.clear()
            for event in subscription.take():
                yield f"id: {event.id}\nevent: {event.type}\ndata: {event.payload}\n\n"
            if subscription.finished:
                assert subscription.state is not None
                yield f"event: end\ndata: {json.dumps({'status': subscription.state[0]})}\n\n"
                return
            try:
                await asyncio.wait_for(subscription.wake.wait(), SSE_KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
