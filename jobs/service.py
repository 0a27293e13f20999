"""What clients do to jobs: submit (idempotently), read, list, cancel, retry. The worker side is `execution.py`.

State machine (the job row is the source of truth; Celery only delivers "run job X"):

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled                       (cancel before a worker claimed it: it never starts)
    running -> cancelling -> cancelled        (cooperative: the stage stops at its next step with a checkpoint)
    failed | cancelled -> queued              (retry: resumes from the last completed stage / checkpoint)
    running -> queued                         (automatic: a system failure with attempts left, after a backoff; or
                                               the worker shut down: `retries.end_attempt`)

Transitions are single conditional UPDATEs, so concurrent requests and the worker cannot both win one.
"""

from __future__ import annotations

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from langadapt.core.adaptation.task_names import MERA_TASKS
from langadapt.core.adaptation.train.plan import TrainingPlan
from langadapt.jobs import quotas, webhooks
from langadapt.jobs.catalogue import check_model_reference
from langadapt.jobs.errors import Conflict, Invalid, NotFound
from langadapt.jobs.limits import check_limits
from langadapt.jobs.models import RETRYABLE, File, Job, JobEvent, JobLabel, JobStatus, Team, utcnow
from langadapt.jobs.pages import page
from langadapt.jobs.planning import plan_job
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest
from langadapt.jobs.storage import ArtifactStore


def get_job(session: Session, team: Team, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.team_id != team.id:
        raise NotFound(f"no job {job_id!r}", code="job_not_found", param="job_id")
    return job


def list_files(session: Session, team: Team, *, after: str | None, limit: int) -> tuple[list[File], str | None]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(File).where(File.team_id == team.id)
    if after is not None:
        query = query.where(File.id < after)
    return page(list(session.scalars(query.order_by(File.id.desc()).limit(limit + 1))), limit, lambda row: row.id)


def get_file(session: Session, team: Team, file_id: str, *, param: str = "file_id") -> File:
    row = session.get(File, file_id)
    if row is None or row.team_id != team.id:
        raise NotFound(f"no file {file_id!r}", code="file_not_found", param=param)
    return row


def create_job(
    *,
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    team: Team,
    request: JobRequest,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created). A replayed Idempotency-Key returns the original job, even when
    the team is at a quota; a new job within the team's queued-jobs and stored-bytes quotas (429 beyond)."""
    fingerprint = request.fingerprint()
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, team, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False
    plan = validate_request(session=session, store=store, settings=settings, team=team, request=request)
    if request.resources.strategy is None and request.resources.gpus > 1:  # written out, as other derived defaults
        strategy = plan.strategy if plan is not None and plan.strategy != "single" else "fsdp2"
        request = request.model_copy(update={"resources": request.resources.model_copy(update={"strategy": strategy})})
    quotas.lock_team(session, team.id)
    if idempotency_key is not None:  # a request with this key may have committed while this one was validated
        existing = _by_idempotency_key(session, team, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False
    quotas.check_submit(session, settings, team.id)
    job = Job(
        team_id=team.id,
        status=JobStatus.queued,
        request=request.model_dump(mode="json"),
        plan=None if plan is None else plan.model_dump(mode="json"),
        base_model=request.base_model,
        instruct_model=request.instruct_model,
        vocab_method=request.vocab.method,
        init_method=request.init.method,
        variants=list(request.variants),
        corpus_file_id=request.corpus_file,
        eval_file_id=request.eval_file,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        max_attempts=request.max_attempts,
        labels=[JobLabel(key=key, value=value) for key, value in request.labels.items()],
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the unique constraint.
        session.rollback()
        existing = _by_idempotency_key(session, team, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, fingerprint), False
    return job, True


def _by_idempotency_key(session: Session, team: Team, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))


def _replay(job: Job, fingerprint: str) -> Job:
    if job.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    return job


def validate_request(
    *, session: Session, store: ArtifactStore, settings: Settings, team: Team, request: JobRequest
) -> TrainingPlan | None:
    """What a submission needs beyond its schema: this server's limits, the team's files, allowed models,
    configured task data, and a training plan that fits this deployment's GPUs (returned; None when the base
    model's shape cannot be read here)."""
    check_limits(request, settings)
    for field, file_id in request.file_ids().items():
        row = session.get(File, file_id)
        if row is None or row.team_id != team.id:
            raise Invalid(f"no file {file_id!r}", code="file_not_found", param=field)
    for field, ref in (("base_model", request.base_model), ("instruct_model", request.instruct_model)):
        if ref is not None:
            check_model_reference(ref, param=field, team_id=team.id, settings=settings, store=store)
    if MERA_TASKS.intersection(request.evaluation.tasks) and not settings.mera_dir:
        raise Invalid(
            "this server has no MERA data configured (LANGADAPT_MERA_DIR)",
            code="task_unavailable",
            param="evaluation.tasks",
        )
    return plan_job(request, settings)


def list_jobs(
    session: Session,
    team: Team,
    *,
    after: str | None,
    limit: int,
    status: str | None = None,
    labels: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> tuple[list[Job], str | None]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Job).where(Job.team_id == team.id)
    if status is not None:
        query = query.where(Job.status == status)
    for key, value in labels:
        query = query.where(exists().where(JobLabel.job_id == Job.id, JobLabel.key == key, JobLabel.value == value))
    if after is not None:
        query = query.where(Job.id < after)
    return page(list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1))), limit, lambda job: job.id)


def cancel_job(session: Session, team: Team, job_id: str) -> Job:
    """Idempotent: a queued job is cancelled at once (it will never start), a running one is asked to stop."""
    job = get_job(session, team, job_id)
    now = utcnow()
    for from_status, to_status in ((JobStatus.queued, JobStatus.cancelled), (JobStatus.running, JobStatus.cancelling)):
        values = {"status": to_status, "cancel_requested": True, "updated_at": now}
        if to_status == JobStatus.cancelled:
            values["finished_at"] = now
        changed = session.execute(
            update(Job).where(Job.id == job.id, Job.status == from_status).values(**values)
        ).rowcount
        if changed:
            _event(session, job.id, f"cancel requested ({from_status} -> {to_status})")
            if to_status == JobStatus.cancelled:
                webhooks.notify(session, job.id, "job.cancelled")
            break
    session.commit()
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Conflict(f"job {job.id} already {job.status}", code="job_not_cancellable", param="job_id")
    return job


def retry_job(session: Session, team: Team, job_id: str) -> Job:
    """Re-queue a failed or cancelled job with a fresh budget of attempts; the worker skips the stages whose outputs
    are complete."""
    job = get_job(session, team, job_id)
    if job.artifacts_expired_at is not None:
        raise Conflict(f"job {job.id}'s stored files were deleted", code="artifacts_expired", param="job_id")
    changed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(list(RETRYABLE)), Job.artifacts_expired_at.is_(None))
        .values(
            status=JobStatus.queued,
            attempt=Job.attempt + 1,
            system_failures=0,
            not_before=None,
            cancel_requested=False,
            dispatched_at=None,
            worker=None,
            heartbeat_at=None,
            finished_at=None,
            error_code=None,
            error_message=None,
            error_stage=None,
            error_kind=None,
            updated_at=utcnow(),
        )
    ).rowcount
    if changed:
        _event(session, job.id, "retry requested")
    session.commit()
    session.refresh(job)
    if not changed:
        raise Conflict(
            f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried",
            code="job_not_retryable",
            param="job_id",
        )
    return job


def list_events(session: Session, job: Job, *, after: int | None, limit: int) -> tuple[list[JobEvent], int | None]:
    """Oldest first; `after` is the last event id already seen."""
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return page(list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1))), limit, lambda event: event.id)


def _event(session: Session, job_id: str, message: str) -> None:
    session.add(JobEvent(job_id=job_id, type="message", message=message))
