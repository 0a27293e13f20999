from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, UploadFile, status

from langadapt.api.deps import CurrentTeam, SessionDep, SettingsDep, StoreDep
from langadapt.api.routes.pagination import Limit
from langadapt.api.schemas import ERROR_RESPONSES, FilePublic, FilesPublic
from langadapt.jobs import service
from langadapt.jobs.errors import TooLarge
from langadapt.jobs.files import upload_file

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FilePublic)
def create_file(
    request: Request, file: UploadFile, team: CurrentTeam, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> FilePublic:
    """Upload a corpus (.txt / .jsonl, optionally .xz / .gz): validated as non-empty UTF-8 text, hashed, stored."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + (1 << 20):
        raise TooLarge(f"the upload is larger than the limit of {settings.max_upload_bytes} bytes", param="file")
    row = upload_file(
        session=session, store=store, settings=settings, team=team, filename=file.filename or "", source=file.file
    )
    return FilePublic.of(row)


@router.get("", response_model=FilesPublic)
def list_files(
    team: CurrentTeam, session: SessionDep, limit: Limit = 20, after: Annotated[str | None, Query()] = None
) -> FilesPublic:
    rows, cursor = service.list_files(session, team, after=after, limit=limit)
    return FilesPublic(data=[FilePublic.of(row) for row in rows], next=cursor)


@router.get("/{file_id}", response_model=FilePublic)
def read_file(file_id: str, team: CurrentTeam, session: SessionDep) -> FilePublic:
    return FilePublic.of(service.get_file(session, team, file_id))
