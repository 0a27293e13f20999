"""The pipeline's typed events as job-row updates and event rows (what pollers and event streams see)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.events import Event, Message, Progress, StageDone, StageSkipped, StageStarted
from langadapt.jobs import execution, webhooks
from langadapt.jobs.models import utcnow

log = logging.getLogger("langadapt.jobs")


class JobEventRecorder:
    """An `EventSink` for one job: stage changes move the job's `stage`, progress sets `progress` (step, total,
    ETA), and every event becomes an event row, each in one transaction. `stage` is the stage being run, for error
    reports.

    A database outage must neither stop the training nor lose what the job reports: an event the database refused
    (unreachable, too many clients, locked) waits, with the time it happened, and is written before the next one, or
    by `flush` when the attempt ends. Only progress reports are dropped while events wait: the next one supersedes
    them. (Before, a refused event was dropped: that is how a restored stage's "skipped" event went missing.)
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self.sessions, self.job_id = sessions, job_id
        self.stage: str | None = None
        self._waiting: list[tuple[datetime, Event]] = []
        self._lock = threading.Lock()  # training loops may report from their own threads

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted | StageSkipped):
            self.stage = event.stage
        with self._lock:
            if isinstance(event, Progress):
                if not self._waiting:
                    self._write(utcnow(), event)
                return
            self._waiting.append((utcnow(), event))
            self._write_waiting()

    def message(self, text: str, *, level: str = "info", stage: str | None = None) -> None:
        self(Message(stage if stage is not None else self.stage, text, level))  # type: ignore[arg-type]

    def flush(self, timeout_s: float) -> bool:
        """Write the events still waiting, retrying for up to `timeout_s`; False when some could not be written."""
        deadline = time.monotonic() + timeout_s
        delay = 0.5
        while True:
            with self._lock:
                if self._write_waiting():
                    return True
            if time.monotonic() + delay > deadline:
                log.error("job %s: %d events could not be recorded", self.job_id, len(self._waiting))
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _write_waiting(self) -> bool:
        while self._waiting:
            if not self._write(*self._waiting[0]):
                return False
            self._waiting.pop(0)
        return True

    def _write(self, ts: datetime, event: Event) -> bool:
        try:
            with self.sessions() as session:
                self._record(session, ts, event)
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("job %s: event not recorded yet (%s): %s", self.job_id, type(exc).__name__, event)
            return False
        return True

    def _record(self, session: Session, ts: datetime, event: Event) -> None:
        job_id = self.job_id
        if isinstance(event, StageStarted | StageSkipped):
            execution.set_stage(session, job_id, event.stage)
            text = "started" if isinstance(event, StageStarted) else "complete output found: skipped"
            execution.append_event(session, job_id, type="stage", stage=event.stage, message=text, ts=ts)
        elif isinstance(event, StageDone):
            execution.record_stage_seconds(session, job_id, event.stage, event.seconds)
            done = {"stage": event.stage, "seconds": event.seconds}
            webhooks.notify(session, job_id, "job.stage_completed", done)
            text = f"done in {event.seconds} s"
            execution.append_event(session, job_id, type="stage", stage=event.stage, message=text, ts=ts)
        elif isinstance(event, Progress):
            rate = event.data.get("tokens_per_s") if event.stage == "cpt" else None
            execution.set_progress(
                session, job_id, step=event.step, total=event.total, eta_s=event.eta_s, cpt_tokens_per_s=rate
            )
            data = {**event.data, "step": event.step, "total": event.total, "unit": event.unit, "eta_s": event.eta_s}
            execution.append_event(session, job_id, type="metrics", stage=event.stage, data=data, ts=ts)
        else:
            assert isinstance(event, Message)
            execution.append_event(
                session,
                job_id,
                type="message",
                stage=event.stage,
                message=event.text,
                level=event.level,
                data=event.data,
                ts=ts,
            )
