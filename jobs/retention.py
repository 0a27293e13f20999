"""Removing what a finished job stored: `DELETE /v1/jobs/{id}` (the job and its files) and the retention period
(`LANGADAPT_ARTIFACT_RETENTION_DAYS`: the files of jobs finished longer ago; the job row and its scores stay).

A job's files are first marked gone (`artifacts_expired_at`, in one conditional UPDATE that a retry cannot pass:
retries refuse such jobs), then deleted from storage, then its rows. A storage failure takes the mark back: the
job stays as it was, and the deletion can simply be tried again.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from langadapt.jobs import layout
from langadapt.jobs.errors import Conflict, Unavailable
from langadapt.jobs.models import TERMINAL, Artifact, Job, Team, utcnow
from langadapt.jobs.service import get_job
from langadapt.jobs.storage import ArtifactStore, StorageError

log = logging.getLogger("langadapt.jobs")


def delete_job(session: Session, store: ArtifactStore, team: Team, job_id: str) -> None:
    """Delete a finished job: its stored objects (artifacts, tensors, checkpoints, manifest), then its rows."""
    job = get_job(session, team, job_id)
    if not _delete_files(session, store, job, only_unmarked=False):
        raise Conflict(f"job {job.id} is {job.status}: cancel it first", code="job_not_finished", param="job_id")
    session.execute(delete(Job).where(Job.id == job.id))
    session.commit()


def expire_artifacts(session: Session, store: ArtifactStore, days: float) -> list[str]:
    """Delete the stored files of jobs finished more than `days` ago; they keep `artifacts_expired_at`."""
    cutoff = utcnow() - timedelta(days=days)
    due = session.scalars(
        select(Job).where(Job.status.in_(list(TERMINAL)), Job.finished_at < cutoff, Job.artifacts_expired_at.is_(None))
    ).all()
    expired = []
    for job in due:
        try:
            if _delete_files(session, store, job, only_unmarked=True):
                expired.append(job.id)
        except Unavailable as exc:  # the next run tries again
            log.warning("retention: job %s: %s", job.id, exc.message)
    return expired


def _delete_files(session: Session, store: ArtifactStore, job: Job, *, only_unmarked: bool) -> bool:
    """Mark, delete the job's objects, drop its artifact rows; False when the job is not finished (or, with
    `only_unmarked`, already marked)."""
    mark = update(Job).where(Job.id == job.id, Job.status.in_(list(TERMINAL)))
    if only_unmarked:
        mark = mark.where(Job.artifacts_expired_at.is_(None))
    previous = job.artifacts_expired_at
    if not session.execute(mark.values(artifacts_expired_at=utcnow())).rowcount:
        session.rollback()
        return False
    session.commit()
    try:
        store.delete_prefix(layout.job_prefix(job.team_id, job.id))
    except StorageError as exc:
        session.execute(update(Job).where(Job.id == job.id).values(artifacts_expired_at=previous))
        session.commit()
        raise Unavailable(f"artifact storage: {exc}; the job was kept, try again", code="storage_unavailable") from exc
    session.execute(delete(Artifact).where(Artifact.job_id == job.id))
    session.commit()
    return True
