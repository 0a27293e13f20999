"""The Celery side both processes share: one base configuration, and dispatch of "run job X" messages.

The API builds the same app as a client (it only sends task names) so it never imports training code; the
worker (`worker/app.py`) registers the tasks on it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session

from langadapt.jobs.models import Job, utcnow
from langadapt.jobs.settings import Settings

RUN_JOB = "langadapt.run_job"
REAP = "langadapt.reap"
DELIVER_WEBHOOKS = "langadapt.deliver_webhooks"
EXPIRE_ARTIFACTS = "langadapt.expire_artifacts"
GPU = "gpu"  # queue roles; the queue names are `settings.queue(role)`
MAINTENANCE = "maintenance"
GPU_COUNTS = (1, 2, 4, 8)


def gpu_role(gpus: int) -> str:
    """The queue role of jobs that need `gpus` GPUs (`resources.gpus`): `gpu` for one, `gpu.K` for K; a worker
    started with `--gpus K` consumes exactly that queue."""
    return GPU if gpus == 1 else f"{GPU}.{gpus}"


GPU_ROLES = tuple(gpu_role(k) for k in GPU_COUNTS)
ROLES = (*GPU_ROLES, MAINTENANCE)

log = logging.getLogger(__name__)


def celery_app(settings: Settings) -> Celery:
    app = Celery("langadapt", broker=settings.broker, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,  # the job table is the source of truth, not a result backend
        task_acks_late=True,  # a message is acknowledged only after the job ran
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one job per GPU
        task_default_queue=settings.queue(GPU),
        task_routes={
            RUN_JOB: {"queue": settings.queue(GPU)},
            REAP: {"queue": settings.queue(MAINTENANCE)},
            DELIVER_WEBHOOKS: {"queue": settings.queue(MAINTENANCE)},
            EXPIRE_ARTIFACTS: {"queue": settings.queue(MAINTENANCE)},
        },
        broker_transport_options=_transport_options(settings),
        broker_connection_timeout=5,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        beat_schedule=_schedule(settings),
        worker_hijack_root_logger=False,
    )
    return app


def _schedule(settings: Settings) -> dict[str, dict[str, object]]:
    every = {
        "reap-stale-jobs": (REAP, settings.reaper_interval_s),
        "deliver-webhooks": (DELIVER_WEBHOOKS, settings.webhook_poll_s),
    }
    if settings.artifact_retention_days is not None:
        every["expire-artifacts"] = (EXPIRE_ARTIFACTS, settings.retention_interval_s)
    return {name: {"task": task, "schedule": timedelta(seconds=period)} for name, (task, period) in every.items()}


def _transport_options(settings: Settings) -> dict[str, int | str]:
    if settings.broker.startswith(("redis", "rediss")):
        # Redis redelivers unacknowledged messages after this; it must exceed the longest job. Every key the
        # transport writes (queues, bindings, unacked messages) carries the queue prefix.
        options: dict[str, int | str] = {"visibility_timeout": settings.visibility_timeout_s}
        if settings.queue_prefix:
            options["global_keyprefix"] = settings.queue_prefix
        return options
    return {}  # the embedded SQLite broker passes its options to create_engine


def dispatch(session: Session, app: Celery, job_id: str, settings: Settings) -> bool:
    """Send "run job X" to the queue of the GPUs it needs; on success mark the job dispatched. A job the broker did
    not take stays undispatched and the reaper sends it again, so a broker outage delays jobs but never loses them."""
    job = session.get(Job, job_id)
    gpus = int(((job.request if job is not None else {}).get("resources") or {}).get("gpus", 1))
    try:
        app.send_task(RUN_JOB, args=[job_id], queue=settings.queue(gpu_role(gpus)))
    except Exception as exc:  # kombu raises many types for an unreachable broker
        log.warning("could not dispatch %s: %s", job_id, exc)
        return False
    session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
    session.commit()
    return True
