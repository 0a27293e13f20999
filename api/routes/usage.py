from __future__ import annotations

from fastapi import APIRouter

from langadapt.api.deps import CurrentTeam, SessionDep, SettingsDep
from langadapt.api.schemas import ERROR_RESPONSES, UsagePublic
from langadapt.jobs import quotas

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=ERROR_RESPONSES)


@router.get("", response_model=UsagePublic)
def read_usage(team: CurrentTeam, session: SessionDep, settings: SettingsDep) -> UsagePublic:
    """The team's current use against each of its limits, and where each limit comes from (the server's default or
    the team's own, set by an administrator)."""
    return UsagePublic.of(quotas.usage(session, settings, team.id))
