"""Celery tasks: thin wrappers over `worker.runner` and `jobs.execution`."""

from __future__ import annotations

import logging
import multiprocessing
from functools import cache

from celery import Task
from celery.signals import worker_shutting_down

from langadapt.jobs import execution, quotas, retention, webhooks
from langadapt.jobs.queue import DELIVER_WEBHOOKS, EXPIRE_ARTIFACTS, REAP, RUN_JOB, dispatch
from langadapt.jobs.runtime import Services, build_services
from langadapt.worker.app import app, settings
from langadapt.worker.runner import DATABASE_UNAVAILABLE, job_process

log = logging.getLogger("langadapt.worker")

UNDISPATCHED_GRACE_S = 30.0
DB_RETRY_S = 5


@cache
def services() -> Services:
    return build_services(settings)


# Job processes are forked by a fork server: a single-threaded process executed (not forked) from this worker that
# has imported the training code and never opened a database, broker or file handle. A fork of this worker could
# inherit a lock held by another of its threads at that instant (SQLite's, polling the embedded broker) and hang.
JOB_PROCESSES = multiprocessing.get_context("forkserver")
JOB_PROCESSES.set_forkserver_preload(["__main__", "langadapt.worker.forkserver", "langadapt.worker.runner"])

_running: multiprocessing.process.BaseProcess | None = None  # the job process of the task being run


@worker_shutting_down.connect
def _preempt_running_job(**_: object) -> None:
    """Warm shutdown (SIGTERM): the solo pool lets the running task finish; tell its job process to stop at a
    checkpoint and go back to the queue (`runner.job_process`). A SIGTERM to the process group reaches it anyway;
    `docker stop` signals only the worker."""
    if _running is not None and _running.pid is not None:
        log.warning("worker shutting down: preempting %s", _running.name)
        _running.terminate()


@app.task(name=RUN_JOB, bind=True, max_retries=None)
def run_job(self: Task, job_id: str) -> int | None:
    """Run the job in a fresh process (`runner.job_process`); its GPU memory and state go with it."""
    global _running
    process = JOB_PROCESSES.Process(target=job_process, args=(job_id,), name=f"job-{job_id}")
    process.start()
    _running = process
    try:
        process.join()
    finally:
        _running = None
    code = process.exitcode
    if code == DATABASE_UNAVAILABLE:  # the database was down before the job could be claimed: keep the message
        log.warning("job %s: database unavailable; retrying in %d s", job_id, DB_RETRY_S)
        raise self.retry(countdown=DB_RETRY_S)
    if code != 0:  # killed, or crashed outside the attempt: the reaper ends its attempt when its heartbeat stops
        log.warning("job %s: its process ended with code %d", job_id, code)
    return code


@app.task(name=REAP)
def reap() -> dict[str, list[str]]:
    """End the attempts of jobs whose worker died (retried while they have attempts left); send queued jobs that
    are due (a retry's backoff passed, a team's place came free: as many of a team's as it has running places
    free) or that the broker never took."""
    current = services()
    with current.sessions() as session:
        reaped = execution.reap_stale(session, settings.heartbeat_timeout_s, settings.retry_backoff_s)
        due = quotas.with_room_to_run(session, settings, execution.undispatched(session, UNDISPATCHED_GRACE_S))
        resent = [job_id for job_id in due if dispatch(session, app, job_id, settings)]
    if reaped or resent:
        log.warning("reaper: worker lost for %s, dispatched %s", reaped, resent)
    return {"reaped": reaped, "redispatched": resent}


@app.task(name=DELIVER_WEBHOOKS, ignore_result=True)
def deliver_webhooks() -> int:
    """Send the webhook deliveries that are due (first tries and retries whose backoff has passed)."""
    return webhooks.deliver_due(services().sessions, settings)


@app.task(name=EXPIRE_ARTIFACTS, ignore_result=True)
def expire_artifacts() -> list[str]:
    """Delete the stored files of jobs finished longer ago than the retention period (scheduled only with one)."""
    days = settings.artifact_retention_days
    if days is None:
        return []
    current = services()
    with current.sessions() as session:
        expired = retention.expire_artifacts(session, current.store, days)
    if expired:
        log.info("retention: deleted the artifacts of %s", expired)
    return expired
