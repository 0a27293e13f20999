"""The pipeline's typed events as job-row updates and event rows (what pollers and event streams see)."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.events import Event, Message, Progress, StageDone, StageSkipped, StageStarted
from langadapt.jobs import execution, webhooks

log = logging.getLogger("langadapt.jobs")


class JobEventRecorder:
    """An `EventSink` for one job: stage changes move the job's `stage`, progress sets `progress` (step, total,
    ETA), and every event becomes an event row. `stage` is the stage being run, for error reports."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self.sessions, self.job_id = sessions, job_id
        self.stage: str | None = None

    def __call__(self, event: Event) -> None:
        try:
            with self.sessions() as session:
                self._record(session, event)
        except SQLAlchemyError as exc:  # a database blip must not kill hours of training; the log keeps the event
            log.warning("job %s: event not recorded (%s): %s", self.job_id, type(exc).__name__, event)

    def _record(self, session: Session, event: Event) -> None:
        add = execution.add_event
        if isinstance(event, StageStarted | StageSkipped):
            self.stage = event.stage
            execution.set_stage(session, self.job_id, event.stage)
            text = "started" if isinstance(event, StageStarted) else "complete output found: skipped"
            add(session, self.job_id, type="stage", stage=event.stage, message=text)
        elif isinstance(event, StageDone):
            execution.record_stage_seconds(session, self.job_id, event.stage, event.seconds)
            done = {"stage": event.stage, "seconds": event.seconds}
            webhooks.notify(session, self.job_id, "job.stage_completed", done)
            add(session, self.job_id, type="stage", stage=event.stage, message=f"done in {event.seconds} s")
        elif isinstance(event, Progress):
            rate = event.data.get("tokens_per_s") if event.stage == "cpt" else None
            execution.set_progress(
                session, self.job_id, step=event.step, total=event.total, eta_s=event.eta_s, cpt_tokens_per_s=rate
            )
            data = {**event.data, "step": event.step, "total": event.total, "unit": event.unit, "eta_s": event.eta_s}
            add(session, self.job_id, type="metrics", stage=event.stage, data=data)
        else:
            assert isinstance(event, Message)
            add(
                session,
                self.job_id,
                type="message",
                stage=event.stage,
                message=event.text,
                level=event.level,
                data=event.data,
            )

    def message(self, text: str, *, level: str = "info", stage: str | None = None) -> None:
        self(Message(stage if stage is not None else self.stage, text, level))  # type: ignore[arg-type]
