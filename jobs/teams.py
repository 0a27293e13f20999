"""Teams and their API keys. Keys are 256-bit random tokens; only their sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from langadapt.jobs.errors import Conflict, NotFound
from langadapt.jobs.models import ApiKey, Team, utcnow

KEY_PREFIX = "la_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(*, session: Session, name: str) -> tuple[Team, str]:
    """A new team and its first API key (returned in clear once, never stored)."""
    if session.scalar(select(Team).where(Team.name == name)) is not None:
        raise Conflict(f"team {name!r} exists", code="team_exists", param="name")
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team, create_key(session=session, team=team)


def create_key(*, session: Session, team: Team) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(team_id=team.id, key_hash=hash_key(key), hint=key[-4:]))
    session.flush()
    return key


def team_by_name(*, session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise NotFound(f"no team {name!r}", code="team_not_found", param="name")
    return team


def list_keys(*, session: Session, team: Team) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.id)))


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    """Revoke a key at once (idempotent); its team keeps its other keys."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no key {key_id!r}", code="key_not_found", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def authenticate(*, session: Session, key: str) -> Team | None:
    """The team owning a valid, unrevoked key, else None."""
    return session.scalar(
        select(Team)
        .join(ApiKey, ApiKey.team_id == Team.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
