"""Response bodies, side by side per resource. Request bodies: `jobs.spec.JobRequest` (POST /v1/jobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from langadapt.jobs.models import Artifact, File, Job, JobEvent, Score


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


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    stage: str | None
    progress: Progress
    attempt: int
    request: dict[str, Any]
    labels: dict[str, str]
    error: JobErrorPublic | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
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
            request=job.request,
            labels={label.key: label.value for label in job.labels},
            error=error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
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
    size: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, row: Artifact) -> ArtifactPublic:
        return cls(name=row.name, kind=row.kind, size=row.size, sha256=row.sha256, created_at=row.created_at)


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


_ERRORS = {
    400: "bad request",
    401: "missing or invalid API key",
    404: "no such resource (or not your team's)",
    409: "conflicts with the resource's state or an earlier request",
    413: "upload too large",
    422: "invalid request; `param` names the field",
    503: "a dependency (database, storage) is unavailable; retry",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _ERRORS.items()
}
