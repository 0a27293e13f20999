"""Per-team quotas: jobs running at once, queued jobs, stored bytes, and the rate of POST requests.

Each limit is a setting (`LANGADAPT_QUOTA_*`) that a team's `team_quotas` row may override (a NULL column keeps the
default; `langadapt admin quota ...` manages the rows). Over a limit:
- queued jobs, stored bytes: the submit (POST /v1/jobs; POST /v1/files for bytes) is a 429 naming the limit. The
  check runs under `lock_team`, so concurrent submits cannot both take a team's last place;
- the POST rate: every POST under /v1 counts, idempotent replays included (a replay is a request like any other;
  a client honouring `Retry-After` gets its job on the next try). One counter per team and fixed window, in the
  database (an atomic upsert), so every API process shares it;
- running jobs: never a 429. A worker does not start a job of a team running its limit already; the job stays
  queued (`execution.claim_job`) and the reaper sends it again once the team has a place free (`with_room_to_run`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from langadapt.jobs.errors import TooMany
from langadapt.jobs.models import ACTIVE, Artifact, File, Job, JobStatus, PostCount, Team, TeamQuota
from langadapt.jobs.settings import Settings

LIMITS = ("running_jobs", "queued_jobs", "stored_bytes", "post_rate")
_UPSERTS: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


@dataclass(frozen=True)
class Limit:
    value: int
    source: Literal["default", "team"]


def team_limits(session: Session, settings: Settings, team_id: str) -> dict[str, Limit]:
    """Each limit of the team: its own where its `team_quotas` row sets one, else the setting."""
    row = session.get(TeamQuota, team_id, populate_existing=True)
    limits = {}
    for name in LIMITS:
        own = getattr(row, name) if row is not None else None
        limits[name] = Limit(own, "team") if own is not None else Limit(getattr(settings, f"quota_{name}"), "default")
    return limits


def set_team_limits(session: Session, team_id: str, values: dict[str, int]) -> None:
    """Override some of a team's limits (the others keep their current value)."""
    row = session.get(TeamQuota, team_id) or TeamQuota(team_id=team_id)
    for name, value in values.items():
        setattr(row, name, value)
    session.add(row)
    session.flush()


def clear_team_limits(session: Session, team_id: str) -> None:
    """Back to the defaults for every limit."""
    session.execute(delete(TeamQuota).where(TeamQuota.team_id == team_id))
    session.flush()


def lock_team(session: Session, team_id: str) -> None:
    """Serialise a team's quota checks until the transaction ends. An UPDATE (that changes nothing) both locks the
    team's row on Postgres and takes SQLite's single write lock, so the check and the insert after it are atomic."""
    session.execute(update(Team).where(Team.id == team_id).values(name=Team.name))


def jobs_in(session: Session, team_id: str, statuses: tuple[JobStatus, ...]) -> int:
    return session.scalar(select(func.count()).where(Job.team_id == team_id, Job.status.in_(statuses))) or 0


def stored_bytes(session: Session, team_id: str) -> int:
    """The team's uploads plus what its jobs' artifacts occupy in storage (a model file stored as a delta counts
    its new tensors only)."""
    uploads = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.team_id == team_id))
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.stored_bytes), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.team_id == team_id)
    )
    return int(uploads or 0) + int(artifacts or 0)


def check_submit(session: Session, settings: Settings, team_id: str) -> None:
    """Refuse a new job of a team at its queued-jobs limit or with its storage full (call under `lock_team`)."""
    limits = team_limits(session, settings, team_id)
    queued = jobs_in(session, team_id, (JobStatus.queued,))
    if queued >= limits["queued_jobs"].value:
        raise TooMany(
            f"your team has {queued} queued jobs, its limit; wait for some to start or cancel some",
            code="quota_queued_jobs",
            retry_after=settings.quota_retry_after_s,
        )
    used = stored_bytes(session, team_id)
    if used >= limits["stored_bytes"].value:
        raise TooMany(
            f"your team stores {used} bytes, its limit is {limits['stored_bytes'].value}; delete files or jobs first",
            code="quota_stored_bytes",
            retry_after=settings.quota_retry_after_s,
        )


def check_upload(session: Session, settings: Settings, team_id: str, size: int) -> None:
    """Refuse an upload that would take the team past its stored-bytes limit (call under `lock_team`)."""
    limit = team_limits(session, settings, team_id)["stored_bytes"].value
    used = stored_bytes(session, team_id)
    if used + size > limit:
        raise TooMany(
            f"this upload of {size} bytes would take your team past its limit of {limit} stored bytes "
            f"({used} used); delete files or jobs first",
            code="quota_stored_bytes",
            retry_after=settings.quota_retry_after_s,
        )


def running_limit_reached(session: Session, settings: Settings, team_id: str) -> int | None:
    """The team's running-jobs limit when it runs that many jobs already, else None (call under `lock_team`)."""
    limit = team_limits(session, settings, team_id)["running_jobs"].value
    return limit if jobs_in(session, team_id, ACTIVE) >= limit else None


def with_room_to_run(session: Session, settings: Settings, job_ids: list[str]) -> list[str]:
    """Of these queued jobs (in order), as many per team as the team has running places free: the reaper does not
    send again a job that a worker would only hold again (the claim still decides)."""
    teams = dict(session.execute(select(Job.id, Job.team_id).where(Job.id.in_(job_ids))).tuples().all())
    free: dict[str, int] = {}
    chosen = []
    for job_id in job_ids:
        team_id = teams.get(job_id)
        if team_id is None:
            continue
        if team_id not in free:
            limit = team_limits(session, settings, team_id)["running_jobs"].value
            free[team_id] = limit - jobs_in(session, team_id, ACTIVE)
        if free[team_id] > 0:
            free[team_id] -= 1
            chosen.append(job_id)
    return chosen


def window_start(settings: Settings, now: float) -> int:
    return int(now // settings.quota_rate_window_s) * settings.quota_rate_window_s


def _window_rest(settings: Settings, start: int, now: float) -> int:
    """Whole seconds until the window that began at `start` ends (at least 1)."""
    return max(1, math.ceil(start + settings.quota_rate_window_s - now))


def count_post(session: Session, settings: Settings, team_id: str, *, now: float | None = None) -> None:
    """Count one POST of the team in the current window, or raise 429 `rate_limited` when the window is full (a
    refused request is not counted). Commits."""
    now = time.time() if now is None else now
    start = window_start(settings, now)
    limit = team_limits(session, settings, team_id)["post_rate"].value
    upsert = _UPSERTS[session.get_bind().dialect.name](PostCount).values(team_id=team_id, window_start=start, count=1)
    counted = session.scalar(
        upsert.on_conflict_do_update(
            index_elements=[PostCount.team_id, PostCount.window_start],
            set_={"count": PostCount.count + 1},
            where=PostCount.count < limit,
        ).returning(PostCount.count)
    )
    if counted == 1:  # a new window: the team's older ones are done with
        session.execute(delete(PostCount).where(PostCount.team_id == team_id, PostCount.window_start < start))
    session.commit()
    if counted is None:
        raise TooMany(
            f"your team sent {limit} POST requests in this {settings.quota_rate_window_s} s window, its limit",
            code="rate_limited",
            retry_after=_window_rest(settings, start, now),
        )


@dataclass(frozen=True)
class Use:
    used: int
    limit: Limit


@dataclass(frozen=True)
class Usage:
    running_jobs: Use
    queued_jobs: Use
    stored_bytes: Use
    post_rate: Use  # POSTs counted in the current window
    window_s: int
    window_resets_in_s: int


def usage(session: Session, settings: Settings, team_id: str, *, now: float | None = None) -> Usage:
    """The team's current use against each of its limits."""
    now = time.time() if now is None else now
    start = window_start(settings, now)
    limits = team_limits(session, settings, team_id)
    posts = session.scalar(select(PostCount.count).where(PostCount.team_id == team_id, PostCount.window_start == start))
    return Usage(
        running_jobs=Use(jobs_in(session, team_id, ACTIVE), limits["running_jobs"]),
        queued_jobs=Use(jobs_in(session, team_id, (JobStatus.queued,)), limits["queued_jobs"]),
        stored_bytes=Use(stored_bytes(session, team_id), limits["stored_bytes"]),
        post_rate=Use(posts or 0, limits["post_rate"]),
        window_s=settings.quota_rate_window_s,
        window_resets_in_s=_window_rest(settings, start, now),
    )
