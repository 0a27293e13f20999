"""The Celery worker: `celery -A langadapt.worker.app worker -Q gpu` (one process per GPU) and
`celery -A langadapt.worker.app worker -Q maintenance -B` (the reaper's schedule). `langadapt worker` wraps both."""

from __future__ import annotations

import os

from celery.signals import worker_init, worker_process_init

from langadapt.jobs.db import check_migrated
from langadapt.jobs.queue import celery_app
from langadapt.jobs.settings import Settings

settings = Settings()
app = celery_app(settings)
app.conf.update(
    include=["langadapt.worker.tasks"],
    # A fresh child process per job: GPU memory and any state a job leaves behind go with it.
    worker_max_tasks_per_child=1,
    beat_schedule_filename=os.path.join(settings.home_path, "celerybeat-schedule"),
)


@worker_init.connect
def _refuse_unmigrated(**_: object) -> None:
    from langadapt.worker.tasks import services

    check_migrated(services().engine)


@worker_process_init.connect
def _no_inherited_connections(**_: object) -> None:
    """A job's process is forked from the worker, whose pool holds the connection `_refuse_unmigrated` opened; two
    processes on one socket corrupt each other's sessions (psycopg's prepared statements clash). Drop the inherited
    pool without closing the parent's connections (SQLAlchemy's recipe for forked processes)."""
    from langadapt.worker.tasks import services

    services().engine.dispose(close=False)
