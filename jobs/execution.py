"""What a worker does to a job row: claim it, heartbeat, report stage / progress / events, record artifacts and
scores, end its attempt (`retries.end_attempt`: finished, or queued again). And the reaper, which ends the attempts
of jobs whose worker stopped heartbeating.

Each function is one short transaction, so the job row is always current for pollers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session

from langadapt.jobs import quotas, retries
from langadapt.jobs.models import ACTIVE, Artifact, AttemptOutcome, Job, JobEvent, JobStatus, Score, WorkerBeat, utcnow
from langadapt.jobs.settings import Settings


@dataclass(frozen=True)
class JobError:
    code: str
    message: str
    stage: str | None
    kind: str  # user | system


def claim_job(session: Session, job_id: str, worker: str, settings: Settings) -> Job | None:
    """queued -> running for this worker; None when the job is not queued (cancelled, already taken, missing) or its
    team runs its limit of jobs already: then it stays queued, undispatched until `quota_hold_s` from now, and the
    reaper sends it again. The team's row is locked, so concurrent workers cannot both take its last place."""
    team_id = session.scalar(select(Job.team_id).where(Job.id == job_id, Job.status == JobStatus.queued))
    if team_id is None:
        session.rollback()
        return None
    quotas.lock_team(session, team_id)
    limit = quotas.running_limit_reached(session, settings, team_id)
    now = utcnow()  # after the count: a job that ended to make room has its finished_at before this started_at
    if limit is not None:
        _hold(session, job_id, limit, not_before=now + timedelta(seconds=settings.quota_hold_s))
        return None
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.running, worker=worker, heartbeat_at=now, started_at=now, updated_at=now)
    ).rowcount
    session.commit()
    return session.get(Job, job_id) if claimed else None


def _hold(session: Session, job_id: str, limit: int, *, not_before: datetime) -> None:
    held = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(dispatched_at=None, not_before=not_before, updated_at=utcnow())
    ).rowcount
    message = f"waiting: team at its running-jobs quota ({limit})"
    if held and not session.scalar(select(exists().where(JobEvent.job_id == job_id, JobEvent.message == message))):
        session.add(JobEvent(job_id=job_id, type="message", message=message))
    session.commit()


def heartbeat(session: Session, job_id: str, worker: str) -> bool:
    """Refresh the heartbeat; True when the worker should stop (cancel asked, or the job is no longer its own)."""
    owned = session.execute(
        update(Job).where(Job.id == job_id, Job.worker == worker, Job.status.in_(ACTIVE)).values(heartbeat_at=utcnow())
    ).rowcount
    session.commit()
    if not owned:
        return True
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def append_event(
    session: Session,
    job_id: str,
    *,
    type: str,
    message: str = "",
    stage: str | None = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
    ts: datetime | None = None,
) -> None:
    """Append an event in the caller's transaction. The job row is locked first, so one job's events commit in the
    order of their ids: a reader paging with `after` (event streams) never passes an id whose event, taken by a
    concurrent writer, is still uncommitted. (SQLite serialises writers anyway.)"""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    row = JobEvent(job_id=job_id, type=type, message=message, stage=stage, level=level, data=data)
    if ts is not None:
        row.ts = ts
    session.add(row)
    session.flush()


def set_stage(session: Session, job_id: str, stage: str) -> None:
    """The stage now running (in the caller's transaction)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(stage=stage, progress_step=None, progress_total=None, eta_s=None, updated_at=utcnow())
    )


def set_progress(
    session: Session,
    job_id: str,
    *,
    step: int,
    total: int | None,
    eta_s: float | None,
    cpt_tokens_per_s: float | None = None,
) -> None:
    """The running stage's progress (in the caller's transaction)."""
    values: dict[str, Any] = {"progress_step": step, "progress_total": total, "eta_s": eta_s}
    if cpt_tokens_per_s is not None:
        values["cpt_tokens_per_s"] = cpt_tokens_per_s
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def record_stage_seconds(session: Session, job_id: str, stage: str, seconds: float) -> None:
    """A completed stage's duration on the job row (in the caller's transaction; metrics read them from there)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is not None:
        job.stage_seconds = {**(job.stage_seconds or {}), stage: seconds}


def record_artifacts(session: Session, job_id: str, entries: list[Artifact]) -> None:
    """Insert or replace artifact rows (a re-run stage replaces its files)."""
    for entry in entries:
        session.merge(entry)
    session.commit()


def artifacts_of(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def record_scores(session: Session, job: Job, rows: list[dict[str, Any]]) -> None:
    """Replace the job's score rows with the evaluate stage's output."""
    session.execute(delete(Score).where(Score.job_id == job.id))
    for row in rows:
        model = str(row["model"])
        session.add(
            Score(
                job_id=job.id,
                team_id=job.team_id,
                model=model,
                variant=model.split(":", 1)[1] if ":" in model else None,
                task=row["task"],
                metric=row["metric"],
                value=float(row["value"]),
                n=int(row["n"]),
            )
        )
    session.commit()


def finish_job(
    session: Session,
    job_id: str,
    worker: str,
    outcome: str,
    error: JobError | None = None,
    *,
    backoff_s: float = 0.0,
) -> JobStatus | None:
    """End this worker's attempt (`AttemptOutcome`), only while it owns the job: a terminal status, or `queued` for
    a retried system failure (after `backoff_s`, doubling per failure) or a preempted attempt. None: not its job."""
    owned = (Job.worker == worker) & Job.status.in_(ACTIVE)
    return retries.end_attempt(session, job_id, owned, AttemptOutcome(outcome), error, first_backoff_s=backoff_s)


def reap_stale(session: Session, timeout_s: float, backoff_s: float) -> list[str]:
    """End the attempts of active jobs whose worker has not heartbeated for `timeout_s`: a system failure
    (`worker_lost`, retried while the job has attempts left), or the cancel it was asked for."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = list(session.scalars(select(Job).where(Job.status.in_(ACTIVE), Job.heartbeat_at < cutoff)))
    reaped = []
    for job in stale:
        owned = (Job.status == job.status) & (Job.heartbeat_at < cutoff)
        if job.status == JobStatus.cancelling:
            outcome, error = AttemptOutcome.cancelled, None
        else:
            message = f"the worker stopped heartbeating for over {timeout_s:.0f} s (crashed or killed)"
            outcome, error = AttemptOutcome.failed, JobError("worker_lost", message, job.stage, "system")
        if retries.end_attempt(session, job.id, owned, outcome, error, first_backoff_s=backoff_s) is not None:
            reaped.append(job.id)
    return reaped


def undispatched(session: Session, older_than_s: float) -> list[str]:
    """Queued jobs to send (again), oldest first: the broker never took them (it was down at submit or retry time),
    or they were held back until `not_before`, which has passed."""
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.queued,
                Job.dispatched_at.is_(None),
                or_(Job.not_before.is_(None), Job.not_before <= now),
                or_(Job.not_before.is_not(None), Job.updated_at < cutoff),
            )
            .order_by(Job.id)
        )
    )


def worker_beat(session: Session, *, name: str, queues: list[str], pid: int) -> None:
    """Record that the worker `name` (consuming `queues`) is alive now."""
    row = session.get(WorkerBeat, name)
    if row is None:
        session.add(WorkerBeat(name=name, queues=",".join(queues), pid=pid))
    else:
        row.queues, row.pid, row.heartbeat_at = ",".join(queues), pid, utcnow()
    session.commit()


def worker_gone(session: Session, name: str) -> None:
    session.execute(delete(WorkerBeat).where(WorkerBeat.name == name))
    session.commit()


def live_workers(session: Session, queues: list[str], within_s: float) -> list[WorkerBeat]:
    """The workers consuming any of `queues` that have beaten within the last `within_s` seconds."""
    cutoff = utcnow() - timedelta(seconds=within_s)
    rows = session.scalars(select(WorkerBeat).where(WorkerBeat.heartbeat_at >= cutoff))
    return [row for row in rows if set(queues).intersection(row.queues.split(","))]
