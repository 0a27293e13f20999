"""Celery tasks: thin wrappers over `worker.runner` and `jobs.execution`."""

from __future__ import annotations

import logging
from functools import cache

from celery import Task
from sqlalchemy.exc import OperationalError

from langadapt.jobs import execution, webhooks
from langadapt.jobs.queue import DELIVER_WEBHOOKS, REAP, RUN_JOB, dispatch
from langadapt.jobs.runtime import Services, build_services
from langadapt.worker.app import app, settings
from langadapt.worker.runner import run_job as run_one_job

log = logging.getLogger("langadapt.worker")

UNDISPATCHED_GRACE_S = 30.0
DB_RETRY_S = 5


@cache
def services() -> Services:
    return build_services(settings)


@app.task(name=RUN_JOB, bind=True, max_retries=None)
def run_job(self: Task, job_id: str) -> str | None:
    try:
        status = run_one_job(services(), job_id)
    except OperationalError as exc:  # the database is down before the job could be claimed: keep the message
        log.warning("job %s: database unavailable (%s); retrying in %d s", job_id, exc, DB_RETRY_S)
        raise self.retry(countdown=DB_RETRY_S) from exc
    return None if status is None else str(status)


@app.task(name=REAP)
def reap() -> dict[str, list[str]]:
    """Fail jobs whose worker died; re-send jobs the broker never took."""
    current = services()
    with current.sessions() as session:
        reaped = execution.reap_stale(session, settings.heartbeat_timeout_s)
        resent = [
            job_id for job_id in execution.undispatched(session, UNDISPATCHED_GRACE_S) if dispatch(session, app, job_id)
        ]
    if reaped or resent:
        log.warning("reaper: failed %s, re-dispatched %s", reaped, resent)
    return {"reaped": reaped, "redispatched": resent}


@app.task(name=DELIVER_WEBHOOKS, ignore_result=True)
def deliver_webhooks() -> int:
    """Send the webhook deliveries that are due (first tries and retries whose backoff has passed)."""
    return webhooks.deliver_due(services().sessions, settings)
