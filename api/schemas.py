"""Response bodies, side by side per resource, shared with the Python client (`langadapt.client`): importing
them needs pydantic only. Request bodies: `jobs.spec.JobRequest` (POST /v1/jobs), `WebhookRequest` here."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from langadapt.core.adaptation.train.plan import TrainingPlan

if TYPE_CHECKING:  # only the `of` constructors use the rows: the client imports these schemas without SQLAlchemy
    from langadapt.jobs.models import Artifact, File, Job, JobAttempt, JobEvent, Score
    from langadapt.jobs.quotas import Usage, Use


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    sha256: str
    documents: int
    chars: int
    created_at: datetime

    @classmethod
    def of(cls, row: File) -> FilePublic:
        return cls(
            id=row.id,
            filename=row.filename,
            bytes=row.bytes,
            sha256=row.sha256,
            documents=row.documents,
            chars=row.chars,
            created_at=row.created_at,
        )


class FilesPublic(BaseModel):
    data: list[FilePublic]
    next: str | None


class Progress(BaseModel):
    step: int | None
    total_steps: int | None
    eta_s: float | None


class JobErrorPublic(BaseModel):
    code: str
    message: str
    stage: str | None
    kind: Literal["user", "system"]


class AttemptPublic(BaseModel):
    """An ended attempt of a job (the current one is the job itself)."""

    attempt: int
    outcome: Literal["succeeded", "failed", "cancelled", "preempted"]
    worker: str | None
    stage: str | None
    error: JobErrorPublic | None
    started_at: datetime | None
    finished_at: datetime
    retry_at: datetime | None = Field(description="when the next attempt may start: a retry's backoff")

    @classmethod
    def of(cls, row: JobAttempt) -> AttemptPublic:
        error = None
        if row.error_code is not None:
            kind = row.error_kind or "system"
            error = JobErrorPublic(code=row.error_code, message=row.error_message or "", stage=row.stage, kind=kind)  # type: ignore[arg-type]
        return cls(
            attempt=row.attempt,
            outcome=row.outcome,  # type: ignore[arg-type]
            worker=row.worker,
            stage=row.stage,
            error=error,
            started_at=row.started_at,
            finished_at=row.finished_at,
            retry_at=row.retry_at,
        )


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    stage: str | None
    progress: Progress
    attempt: int
    max_attempts: int = Field(description="attempts before a system failure is final (manual retry: a fresh budget)")
    attempts: list[AttemptPublic] = Field(description="the ended attempts, oldest first")
    not_before: datetime | None = Field(description="a queued job does not start before this (a retry's backoff)")
    request: dict[str, Any]
    plan: TrainingPlan | None  # how CPT runs (GPUs, DDP / FSDP2, micro-batch, memory per GPU); None: not planned
    labels: dict[str, str]
    error: JobErrorPublic | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifacts_expired_at: datetime | None  # retention deleted its artifacts then (its scores stay)
    updated_at: datetime

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        error = None
        if job.error_code is not None:
            error = JobErrorPublic(
                code=job.error_code,
                message=job.error_message or "",
                stage=job.error_stage,
                kind=job.error_kind or "system",  # type: ignore[arg-type]
            )
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            stage=job.stage,
            progress=Progress(step=job.progress_step, total_steps=job.progress_total, eta_s=job.eta_s),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            attempts=[AttemptPublic.of(row) for row in job.attempts],
            not_before=job.not_before,
            request=job.request,
            plan=None if job.plan is None else TrainingPlan.model_validate(job.plan),
            labels={label.key: label.value for label in job.labels},
            error=error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            artifacts_expired_at=job.artifacts_expired_at,
            updated_at=job.updated_at,
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next: str | None


class EventPublic(BaseModel):
    id: int
    ts: datetime
    level: str
    type: Literal["message", "metrics", "stage"]
    stage: str | None
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, event: JobEvent) -> EventPublic:
        return cls(
            id=event.id,
            ts=event.ts,
            level=event.level,
            type=event.type,  # type: ignore[arg-type]
            stage=event.stage,
            message=event.message,
            data=event.data,
        )


class EventsPublic(BaseModel):
    data: list[EventPublic]
    next: int | None


class ArtifactPublic(BaseModel):
    name: str
    kind: str
    size: int  # of the complete file a download yields
    sha256: str
    stored_bytes: int  # what it occupies in storage: a model file shares unchanged tensors with other models
    created_at: datetime

    @classmethod
    def of(cls, row: Artifact) -> ArtifactPublic:
        return cls(
            name=row.name,
            kind=row.kind,
            size=row.size,
            sha256=row.sha256,
            stored_bytes=row.stored_bytes,
            created_at=row.created_at,
        )


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    next: None = None


class ScorePublic(BaseModel):
    id: int
    job_id: str
    model: str
    variant: str | None
    task: str
    metric: str
    value: float
    n: int
    created_at: datetime

    @classmethod
    def of(cls, row: Score) -> ScorePublic:
        return cls(
            id=row.id,
            job_id=row.job_id,
            model=row.model,
            variant=row.variant,
            task=row.task,
            metric=row.metric,
            value=row.value,
            n=row.n,
            created_at=row.created_at,
        )


class ScoresPublic(BaseModel):
    data: list[ScorePublic]
    next: None = None


class ResultPublic(ScorePublic):
    """A score row with the parameters of the job that produced it."""

    base_model: str
    instruct_model: str | None
    vocab_method: str
    init_method: str
    labels: dict[str, str]

    @classmethod
    def join(cls, score: Score, job: Job) -> ResultPublic:
        return cls(
            **ScorePublic.of(score).model_dump(),
            base_model=job.base_model,
            instruct_model=job.instruct_model,
            vocab_method=job.vocab_method,
            init_method=job.init_method,
            labels={label.key: label.value for label in job.labels},
        )


class ResultsPublic(BaseModel):
    data: list[ResultPublic]
    next: int | None


class ResultGroup(BaseModel):
    key: dict[str, str | None]
    mean: float
    min: float
    max: float
    count: int
    latest_at: datetime | None


class ResultGroupsPublic(BaseModel):
    data: list[ResultGroup]
    next: None = None


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    source: Literal["builtin", "configured"]


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    next: None = None


class StageEstimate(BaseModel):
    stage: str
    tokens: int | None = Field(description="tokens the stage processes (trains on, generates or scores)")
    steps: int | None = Field(description="optimizer steps (training stages)")
    gpu_minutes: float | None = Field(description="null: no throughput known for this stage and model")
    tokens_per_s: float | None
    rate_source: str | None = Field(description="where the throughput comes from: measured (finished jobs) or seed")


class PayoffEstimate(BaseModel):
    """Chars/token of the source tokenizer and of a quick build of the proposed vocabulary, on a corpus sample."""

    sample_chars: int
    source_chars_per_token: float
    proposed_chars_per_token: float
    proposed: str = Field(description="what was built to measure it")
    gain: float = Field(description="proposed / source chars per token: > 1 means shorter sequences")
    cached: bool


class EstimatePublic(BaseModel):
    object: Literal["estimate"] = "estimate"
    request: dict[str, Any] = Field(description="the validated job request, defaults filled in")
    stages: list[StageEstimate]
    gpu_minutes: float | None = Field(description="sum over stages; null when a stage's throughput is unknown")
    artifact_bytes: int | None = Field(description="bytes the job's artifacts will take (null: model size unknown)")
    payoff: PayoffEstimate | None


WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "job.stage_completed", "job.retrying"]
WEBHOOK_EVENTS: tuple[str, ...] = (
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "job.stage_completed",
    "job.retrying",  # a system failure with attempts left: `job.failed` comes only when none are
)


class WebhookRequest(BaseModel):
    url: str = Field(min_length=8, max_length=2000, description="http(s) URL deliveries are POSTed to")
    events: list[WebhookEvent] = Field(default=list(WEBHOOK_EVENTS), min_length=1)


class WebhookPublic(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    events: list[str]
    created_at: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="signing secret, shown once: verify `Langadapt-Signature` with it")


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]
    next: None = None


class WebhookDeliveryPublic(BaseModel):
    id: int
    event: str
    job_id: str | None
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    response_status: int | None
    error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class WebhookDeliveriesPublic(BaseModel):
    data: list[WebhookDeliveryPublic]
    next: None = None


class LimitUse(BaseModel):
    used: int
    limit: int
    source: Literal["default", "team"] = Field(description="the server's default, or the team's own limit")

    @classmethod
    def of(cls, use: Use) -> LimitUse:
        return cls(used=use.used, limit=use.limit.value, source=use.limit.source)


class UsagePublic(BaseModel):
    object: Literal["usage"] = "usage"
    running_jobs: LimitUse = Field(description="jobs running (or cancelling); more wait queued, no 429")
    queued_jobs: LimitUse = Field(description="jobs queued; a submit beyond is a 429 `quota_queued_jobs`")
    stored_bytes: LimitUse = Field(
        description="uploads plus the jobs' artifacts; beyond, an upload or submit is a 429 `quota_stored_bytes`"
    )
    post_rate: LimitUse = Field(description="POST requests under /v1 in the current window (429 `rate_limited`)")
    window_s: int = Field(description="length of the POST rate window")
    window_resets_in_s: int = Field(description="seconds until the current window ends and its count restarts")

    @classmethod
    def of(cls, usage: Usage) -> UsagePublic:
        return cls(
            running_jobs=LimitUse.of(usage.running_jobs),
            queued_jobs=LimitUse.of(usage.queued_jobs),
            stored_bytes=LimitUse.of(usage.stored_bytes),
            post_rate=LimitUse.of(usage.post_rate),
            window_s=usage.window_s,
            window_resets_in_s=usage.window_resets_in_s,
        )


_ERRORS = {
    400: "bad request",
    401: "missing or invalid API key",
    404: "no such resource (or not your team's)",
    409: "conflicts with the resource's state or an earlier request",
    413: "upload too large",
    422: "invalid request; `param` names the field",
    429: "over a team quota or the POST rate limit: `code` names it; retry after `Retry-After` seconds",
    503: "a dependency (database, storage) is unavailable; retry",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _ERRORS.items()
}
