"""How an attempt of a job ends, and whether the job gets another: every ended attempt is a `job_attempts` row and
an event. A system failure (worker lost, storage down, internal error) goes back to the queue with exponential
backoff (`Job.not_before`; the reaper sends it when due) while the job has attempts left (`max_attempts`); a user
error, a cancel or the last allowed failure ends the job. A worker shutting down (SIGTERM) puts its job back at
once without using up an attempt: it stopped at a checkpoint, nothing failed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from langadapt.jobs import webhooks
from langadapt.jobs.models import AttemptOutcome, Job, JobAttempt, JobEvent, JobStatus, utcnow

if TYPE_CHECKING:
    from langadapt.jobs.execution import JobError

MAX_BACKOFF_S = 3600.0


def backoff_s(first_s: float, failures: int) -> float:
    """The delay before the retry of the `failures`-th system failure: `first_s`, doubling, at most an hour."""
    return min(first_s * 2 ** (failures - 1), MAX_BACKOFF_S)


def end_attempt(
    session: Session,
    job_id: str,
    owned: ColumnElement[bool],
    outcome: AttemptOutcome,
    error: JobError | None,
    *,
    first_backoff_s: float,
) -> JobStatus | None:
    """Record how the job's current attempt ended, while `owned` (the caller's claim on the attempt) still holds;
    returns the job's new status (`queued` when it gets another attempt), None when the claim no longer held."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    if outcome == AttemptOutcome.preempted and job.status == JobStatus.cancelling:
        outcome = AttemptOutcome.cancelled  # a cancel was asked as well: the user's word wins
    now = utcnow()
    system_failure = outcome == AttemptOutcome.failed and error is not None and error.kind == "system"
    failures = job.system_failures + int(system_failure)
    delay: float | None = None
    values: dict[str, Any] = {"system_failures": failures, "updated_at": now, "eta_s": None}
    if outcome == AttemptOutcome.preempted or (system_failure and failures < job.max_attempts):
        delay = backoff_s(first_backoff_s, failures) if system_failure else 0.0
        status = JobStatus.queued
        values.update(
            status=status,
            attempt=job.attempt + 1,
            not_before=now + timedelta(seconds=delay),
            dispatched_at=None,  # the reaper sends it once `not_before` has passed
            worker=None,
            heartbeat_at=None,
            cancel_requested=False,
        )
    else:
        status = JobStatus(str(outcome))
        values.update(status=status, finished_at=now)
        if error is not None:
            values.update(
                error_code=error.code,
                error_message=error.message[:4000],
                error_stage=error.stage,
                error_kind=error.kind,
            )
    ended = JobAttempt(
        job_id=job_id,
        attempt=job.attempt,
        worker=job.worker,
        outcome=outcome,
        stage=error.stage if error is not None else job.stage,
        error_code=error.code if error is not None else None,
        error_message=error.message[:4000] if error is not None else None,
        error_kind=error.kind if error is not None else None,
        started_at=job.started_at,
        finished_at=now,
        retry_at=None if delay is None else now + timedelta(seconds=delay),
    )
    text = _describe(job, outcome, error, delay, failures)
    event = None
    if text is not None:
        data = {"attempt": job.attempt, "outcome": str(outcome), "error_code": error.code if error else None}
        level = "warning" if status == JobStatus.queued else "error"
        event = JobEvent(job_id=job_id, type="message", level=level, stage=job.stage, message=text, data=data)
    # The UPDATE refreshes `job` in this session: what the records need of the attempt was read above.
    if not session.execute(update(Job).where(Job.id == job_id, owned).values(**values)).rowcount:
        session.rollback()
        return None
    session.add_all([ended] if event is None else [ended, event])
    if status == JobStatus.queued and system_failure:
        webhooks.notify(session, job_id, "job.retrying", {"failed_attempt": ended.attempt, "retry_in_s": delay})
    elif status != JobStatus.queued:
        webhooks.notify(session, job_id, f"job.{status}")
    session.commit()
    return status


def _describe(
    job: Job, outcome: AttemptOutcome, error: JobError | None, delay: float | None, failures: int
) -> str | None:
    """The event of an attempt that ended with more than its own stage's events say (None: nothing to add)."""
    if outcome == AttemptOutcome.preempted:
        return f"attempt {job.attempt} preempted by worker shutdown: back in the queue from its last checkpoint"
    if outcome != AttemptOutcome.failed or error is None or error.kind != "system":
        return None
    head = f"attempt {job.attempt} failed ({error.code})"
    if delay is not None:
        return f"{head}: retrying in {delay:.0f} s ({job.max_attempts - failures} more attempts allowed)"
    return f"{head}: no attempts left ({failures} of max_attempts {job.max_attempts} failed)"
