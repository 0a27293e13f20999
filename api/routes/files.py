from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from langadapt.api.deps import CurrentTeam, ServicesDep, SessionDep, SettingsDep, SlotsDep, TeamBeforeBody
from langadapt.api.routes.pagination import Limit
from langadapt.api.schemas import ERROR_RESPONSES, FilePublic, FilesPublic
from langadapt.jobs import service
from langadapt.jobs.errors import Invalid, ServiceError, TooLarge
from langadapt.jobs.files import record_upload, store_upload

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)

FORM_OVERHEAD = 1 << 20  # multipart boundaries and part headers around the file
UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FilePublic, openapi_extra=UPLOAD_SCHEMA)
async def create_file(
    request: Request, team: TeamBeforeBody, services: ServicesDep, slots: SlotsDep, settings: SettingsDep
) -> FilePublic:
    """Upload a corpus (.txt / .jsonl, optionally .xz / .gz) as the form field `file`: validated as non-empty UTF-8
    text, hashed, stored. The key is checked before the body is read; a declared `Content-Length` over the limit is
    refused before reading, and a body that grows past it is cut off as it arrives."""
    limit = settings.max_upload_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the upload is larger than the limit of {settings.max_upload_bytes} bytes", param="file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the file as multipart/form-data, in the field 'file'", param="file")
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit, settings.max_upload_bytes), max_files=1)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise Invalid(f"malformed multipart body: {exc.message}", param="file") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise Invalid("no file in the form field 'file'", code="missing_file", param="file")
        row = await run_in_threadpool(
            partial(
                store_upload,
                store=services.store,
                settings=settings,
                team=team,
                filename=upload.filename or "",
                source=upload.file,
            )
        )
    finally:
        await form.close()
    row = await slots.run(services.sessions, partial(record_upload, store=services.store, settings=settings, row=row))
    return FilePublic.of(row)


async def _limited(stream: AsyncIterator[bytes], limit: int, file_limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise TooLarge(f"the upload is larger than the limit of {file_limit} bytes", param="file")
        yield chunk


@router.get("", response_model=FilesPublic)
def list_files(
    team: CurrentTeam, session: SessionDep, limit: Limit = 20, after: Annotated[str | None, Query()] = None
) -> FilesPublic:
    rows, cursor = service.list_files(session, team, after=after, limit=limit)
    return FilesPublic(data=[FilePublic.of(row) for row in rows], next=cursor)


@router.get("/{file_id}", response_model=FilePublic)
def read_file(file_id: str, team: CurrentTeam, session: SessionDep) -> FilePublic:
    return FilePublic.of(service.get_file(session, team, file_id))
