"""The Celery worker: `celery -A langadapt.worker.app worker -Q gpu --pool solo` (one process per GPU) and
`celery -A langadapt.worker.app worker -Q maintenance -B --pool solo` (the reaper's schedule). `langadapt worker`
wraps both.

The worker never forks itself: it runs tasks in its own main thread (solo pool), and each job in a fresh process
forked by a fork server (`tasks.JOB_PROCESSES`): a single-threaded process, executed rather than forked, that has
imported the training code and holds no database, broker or file handle. A fork of the worker could inherit a lock
held by another of its threads at that instant (SQLite's, polling the embedded broker) and hang on it forever. The
job's process takes its GPU memory and state with it when it ends.
"""

from __future__ import annotations

import os
import threading

from celery.signals import worker_init, worker_ready, worker_shutdown

from langadapt.jobs import execution
from langadapt.jobs.db import check_migrated
from langadapt.jobs.queue import celery_app
from langadapt.jobs.settings import Settings

settings = Settings()
app = celery_app(settings)
app.conf.update(
    include=["langadapt.worker.tasks"],
    beat_schedule_filename=os.path.join(settings.home_path, "celerybeat-schedule"),
)


@worker_init.connect
def _refuse_unmigrated(**_: object) -> None:
    from langadapt.worker.tasks import services

    check_migrated(services().engine)


class Beat(threading.Thread):
    """Records every `worker_beat_interval_s` that this worker is alive (`/readyz` looks for a GPU worker's)."""

    def __init__(self, name: str, queues: list[str]) -> None:
        super().__init__(daemon=True, name="worker-beat")
        self.node, self.queues = name, queues
        self.stopped = threading.Event()

    def run(self) -> None:
        from langadapt.worker.tasks import services

        while True:
            try:
                with services().sessions() as session:
                    execution.worker_beat(session, name=self.node, queues=self.queues, pid=os.getpid())
            except Exception as exc:  # a database blip: the next beat tries again
                app.log.get_default_logger().warning("worker beat failed: %s", exc)
            if self.stopped.wait(settings.worker_beat_interval_s):
                return

    def stop(self) -> None:
        from langadapt.worker.tasks import services

        self.stopped.set()
        self.join(timeout=5)
        try:
            with services().sessions() as session:
                execution.worker_gone(session, self.node)
        except Exception:  # the row expires on its own
            pass


_beat: Beat | None = None


@worker_ready.connect
def _start_beat(sender: object, **_: object) -> None:
    global _beat
    queues = sorted(app.amqp.queues.consume_from)
    _beat = Beat(getattr(sender, "hostname", None) or f"worker-{os.getpid()}", queues)
    _beat.start()


@worker_shutdown.connect
def _stop_beat(**_: object) -> None:
    if _beat is not None:
        _beat.stop()
