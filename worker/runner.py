"""Run one job on this worker: claim it, keep a heartbeat / cancel monitor beside it, and hand it to the job
domain (`jobs.attempt.run_attempt`) with the pipeline that does the work.

SIGTERM to a job's process (the worker shutting down: sent to the process group, or forwarded by the worker,
`tasks.py`) preempts the job: it stops at its next checkpoint like a cancel, and goes back to the queue."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import uuid

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.pipeline import run_pipeline
from langadapt.jobs import execution
from langadapt.jobs.attempt import run_attempt
from langadapt.jobs.models import JobStatus
from langadapt.jobs.runtime import Services

log = logging.getLogger("langadapt.worker")

DATABASE_UNAVAILABLE = 75  # exit code of a job process that could not reach the database to claim its job

SHUTDOWN = threading.Event()  # set by SIGTERM in a job's process


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Monitor(threading.Thread):
    """Heartbeats the job every `interval` seconds and raises `stop` on a cancel request or lost ownership."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, worker: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"monitor-{job_id}")
        self.sessions, self.job_id, self.worker, self.interval = sessions, job_id, worker, interval
        self.stop = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with self.sessions() as session:
                    if execution.heartbeat(session, self.job_id, self.worker):
                        self.stop.set()
            except Exception as exc:  # a database blip must not kill the job; the reaper judges staleness
                log.warning("heartbeat for %s failed: %s", self.job_id, exc)

    def close(self) -> None:
        self._done.set()
        self.join(timeout=5)


def run_job(services: Services, job_id: str) -> JobStatus | None:
    """Run a queued job to a terminal status; None when it was not started (not queued, or held by a quota)."""
    worker = worker_name()
    with services.sessions() as session:
        job = execution.claim_job(session, job_id, worker, services.settings)
    if job is None:
        log.info("job %s is not queued, or its team runs its quota of jobs: not started", job_id)
        return None
    log.info("job %s: attempt %d on %s", job.id, job.attempt, worker)
    monitor = Monitor(services.sessions, job.id, worker, services.settings.heartbeat_interval_s)
    monitor.start()
    try:
        return run_attempt(
            job,
            worker=worker,
            settings=services.settings,
            sessions=services.sessions,
            store=services.store,
            pipeline=run_pipeline,
            should_cancel=monitor.stop.is_set,
            preempted=SHUTDOWN.is_set,
        )
    finally:
        monitor.close()


def job_process(job_id: str) -> None:
    """The body of a job's own process (`tasks.run_job`): its own services, one job, exit code 75 when the
    database could not be reached to claim it."""
    from langadapt.jobs.runtime import build_services
    from langadapt.jobs.settings import Settings

    signal.signal(signal.SIGTERM, lambda *_: SHUTDOWN.set())
    services = build_services(Settings())
    try:
        run_job(services, job_id)
    except OperationalError as exc:
        log.warning("job %s: database unavailable (%s)", job_id, exc)
        sys.exit(DATABASE_UNAVAILABLE)
    finally:
        services.engine.dispose()
