"""Request dependencies as `Annotated` aliases, so route signatures read like prose.

Dependencies that do no I/O are `async def`: FastAPI runs sync ones in the thread pool, a hop per request each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from langadapt.api.streams import DatabaseSlots
from langadapt.jobs.errors import ServiceError
from langadapt.jobs.models import Team
from langadapt.jobs.runtime import Services
from langadapt.jobs.settings import Settings
from langadapt.jobs.storage import ArtifactStore
from langadapt.jobs.teams import authenticate


class Unauthenticated(ServiceError):
    status = 401
    code = "invalid_api_key"


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_slots(request: Request) -> DatabaseSlots:
    return request.app.state.db_slots


SlotsDep = Annotated[DatabaseSlots, Depends(get_slots)]


async def get_session(services: ServicesDep, slots: SlotsDep) -> AsyncIterator[Session]:
    """A session inside a database slot (`streams.DatabaseSlots`), closed (its connection back in the pool) as soon
    as the route returns, before the response is sent: a streamed response holds none."""
    async with slots.slot():
        session = services.sessions()
        try:
            yield session
        finally:
            await run_in_threadpool(session.close)  # returning a connection may talk to the database


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_store(services: ServicesDep) -> ArtifactStore:
    return services.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


# The OpenAPI security scheme (Swagger's Authorize button); the check itself is `current_team`.
api_key = HTTPBearer(auto_error=False, scheme_name="APIKey", description="a team's API key: `Bearer la_...`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(api_key)]


def current_team(credentials: Credentials, session: SessionDep) -> Team:
    if credentials is None or not credentials.credentials.strip():
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    team = authenticate(session=session, key=credentials.credentials.strip())
    if team is None:
        raise Unauthenticated("invalid or revoked API key")
    return team


CurrentTeam = Annotated[Team, Depends(current_team)]
