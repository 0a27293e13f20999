from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, status
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from langadapt.api.deps import CurrentTeam, ServicesDep, SessionDep
from langadapt.api.schemas import ERROR_RESPONSES, ArtifactPublic, ArtifactsPublic, ScorePublic, ScoresPublic
from langadapt.jobs.errors import Gone, Invalid, NotFound
from langadapt.jobs.execution import artifacts_of
from langadapt.jobs.models import Artifact, Job
from langadapt.jobs.results import job_scores
from langadapt.jobs.runtime import Services
from langadapt.jobs.service import get_job
from langadapt.jobs.storage import InvalidKey, content_disposition, validate_key

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["artifacts"], responses=ERROR_RESPONSES)


@router.get("/artifacts", response_model=ArtifactsPublic)
def list_artifacts(job_id: str, team: CurrentTeam, session: SessionDep) -> ArtifactsPublic:
    job = get_job(session, team, job_id)
    return ArtifactsPublic(data=[ArtifactPublic.of(row) for row in artifacts_of(session, job.id)])


@router.get(
    "/artifacts/{name:path}",
    operation_id="download_artifact",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 307: {"description": "presigned URL (S3)"}},
)
@router.head("/artifacts/{name:path}", operation_id="artifact_headers", response_class=Response)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    services: ServicesDep,
) -> Response:
    """The artifact's bytes: a redirect to a short-lived presigned URL on S3, a streamed file on a local store.
    A model file kept as a recipe (only its changed tensors stored) is assembled and streamed by the API: 409
    `input_model_changed` / 410 `input_model_unavailable` when an input model it shares tensors with changed or
    vanished, 410 `artifacts_expired` after retention deleted the job's files. HEAD answers with its size and
    sha256 (`ETag`, `X-Content-SHA256`) and no body, on every store."""
    return artifact_response(get_job(session, team, job_id), name, request, session, services)


def artifact_response(job: Job, name: str, request: Request, session: Session, services: Services) -> Response:
    """A job's artifact by name: HEAD headers, a presigned redirect (S3), the streamed file, or the file assembled
    from its recipe (shared with the dashboard's download links)."""
    _check_name(name, request)
    if job.artifacts_expired_at is not None:
        raise Gone(f"job {job.id}: artifacts expired at {job.artifacts_expired_at}", code="artifacts_expired")
    row = session.get(Artifact, (job.id, name))
    if row is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", code="artifact_not_found", param="name")
    filename = name.rsplit("/", 1)[-1]
    if request.method == "HEAD":  # a presigned URL is signed for GET only: answer here
        headers = {
            "Content-Length": str(row.size),
            "ETag": f'"{row.sha256}"',
            "X-Content-SHA256": row.sha256,
            "Content-Disposition": content_disposition(filename),
        }
        return Response(media_type="application/octet-stream", headers=headers)
    store, settings = services.store, services.settings
    if row.recipe is not None:
        services.assembler.verify(row.recipe)  # before the stream starts: afterwards no error can be answered
        start = _range_start(request.headers.get("range"), row.size)
        headers = {
            "Content-Length": str(row.size - start),
            "X-Content-SHA256": row.sha256,
            "Content-Disposition": content_disposition(filename),
            "Accept-Ranges": "bytes",
        }
        if start:
            headers["Content-Range"] = f"bytes {start}-{row.size - 1}/{row.size}"
        return StreamingResponse(
            services.assembler.chunks(row.recipe, start),
            status_code=status.HTTP_206_PARTIAL_CONTENT if start else status.HTTP_200_OK,
            media_type="application/octet-stream",
            headers=headers,
        )
    url = store.presigned_get(row.storage_key, timedelta(seconds=settings.presign_ttl_s), filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    path = store.local_path(row.storage_key)
    if path is not None:
        return FileResponse(path, filename=filename, media_type="application/octet-stream")
    return StreamingResponse(store.iter_bytes(row.storage_key), media_type="application/octet-stream")


def _range_start(header: str | None, size: int) -> int:
    """The first byte of an open-ended `Range: bytes=N-` (how downloads resume); 0 (the whole file) for anything
    else, which HTTP allows a server to answer with 200."""
    if header is None or not header.startswith("bytes=") or not header.endswith("-"):
        return 0
    first = header[len("bytes=") : -1]
    return int(first) if first.isdigit() and int(first) < size else 0


def _check_name(name: str, request: Request) -> None:
    """Names are '<stage>/<path>' exactly as listed: a valid store key (no traversal, '%' or backslash), and no
    separator may arrive URL-encoded (the decoded path could not tell it from a real one)."""
    raw = request.scope.get("raw_path", b"").decode("latin-1").lower()
    try:
        validate_key(name)
    except InvalidKey:
        raise Invalid(f"invalid artifact name {name!r}", code="invalid_artifact_name", param="name") from None
    if "%2f" in raw or "%5c" in raw:
        raise Invalid(f"invalid artifact name {name!r}", code="invalid_artifact_name", param="name")


@router.get("/scores", response_model=ScoresPublic, tags=["results"])
def list_scores(job_id: str, team: CurrentTeam, session: SessionDep) -> ScoresPublic:
    job = get_job(session, team, job_id)
    return ScoresPublic(data=[ScorePublic.of(row) for row in job_scores(session, job)])
