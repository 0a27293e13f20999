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
from langadapt.jobs import quotas
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


def _api_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials.strip():
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    return credentials.credentials.strip()


def _team_of(session: Session, *, key: str) -> Team:
    team = authenticate(session=session, key=key)
    if team is None:
        raise Unauthenticated("invalid or revoked API key")
    return team


def current_team(request: Request, credentials: Credentials, session: SessionDep, settings: SettingsDep) -> Team:
    """The team of the request's API key; a POST counts toward the team's rate limit (`jobs/quotas.py`)."""
    team = _team_of(session, key=_api_key(credentials))
    if request.method == "POST":
        quotas.count_post(session, settings, team.id)
    return team


CurrentTeam = Annotated[Team, Depends(current_team)]


async def team_before_body(credentials: Credentials, services: ServicesDep, slots: SlotsDep) -> Team:
    """`current_team` for POSTs that read a long body themselves (uploads): checked (and counted toward the rate
    limit) before a byte of it is read, with a session of its own that is closed at once (nothing is held while
    the body arrives)."""
    key = _api_key(credentials)

    def counted(session: Session) -> Team:
        team = _team_of(session, key=key)
        quotas.count_post(session, services.settings, team.id)
        return team

    return await slots.run(services.sessions, counted)


TeamBeforeBody = Annotated[Team, Depends(team_before_body)]
