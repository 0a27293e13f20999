"""Score rows joined with their job's parameters, for dashboards: filter, group, newest first."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, func, select
from sqlalchemy.orm import Session

from langadapt.jobs.models import Job, JobLabel, Score, Team
from langadapt.jobs.pages import page

# group-by / filter name -> column
COLUMNS: dict[str, Any] = {
    "task": Score.task,
    "metric": Score.metric,
    "model": Score.model,
    "variant": Score.variant,
    "vocab_method": Job.vocab_method,
    "init_method": Job.init_method,
    "base_model": Job.base_model,
    "instruct_model": Job.instruct_model,
    "job_id": Score.job_id,
}


@dataclass
class ResultFilter:
    equals: dict[str, str] = field(default_factory=dict)  # keys of COLUMNS
    labels: list[tuple[str, str]] = field(default_factory=list)
    since: datetime | None = None
    until: datetime | None = None


def _where(query: Select[Any], team: Team, flt: ResultFilter) -> Select[Any]:
    conditions: list[ColumnElement[bool]] = [Score.team_id == team.id]
    conditions += [COLUMNS[name] == value for name, value in flt.equals.items()]
    conditions += [
        exists().where(JobLabel.job_id == Score.job_id, JobLabel.key == key, JobLabel.value == value)
        for key, value in flt.labels
    ]
    if flt.since is not None:
        conditions.append(Score.created_at >= flt.since)
    if flt.until is not None:
        conditions.append(Score.created_at < flt.until)
    return query.join(Job, Job.id == Score.job_id).where(*conditions)


def list_results(
    session: Session, team: Team, flt: ResultFilter, *, after: int | None, limit: int
) -> tuple[list[tuple[Score, Job]], int | None]:
    query = _where(select(Score, Job), team, flt)
    if after is not None:
        query = query.where(Score.id < after)
    rows = [(score, job) for score, job in session.execute(query.order_by(Score.id.desc()).limit(limit + 1))]
    return page(rows, limit, lambda row: row[0].id)


# Always part of a group: a mean over different tasks, metrics or models (an exact match with an F1, the original
# with the adapted model) means nothing.
ALWAYS_GROUPED = ("task", "metric", "model")


def group_keys(group_by: list[str]) -> list[str]:
    """The requested columns, then those of `ALWAYS_GROUPED` not among them."""
    names = list(dict.fromkeys(group_by))
    return names + [name for name in ALWAYS_GROUPED if name not in names]


def group_results(session: Session, team: Team, flt: ResultFilter, group_by: list[str], *, limit: int) -> list[dict]:
    """One aggregate (mean, min, max, count) per group of `group_keys(group_by)`, the latest group first."""
    group_by = group_keys(group_by)
    keys = [COLUMNS[name].label(name) for name in group_by]
    query = _where(
        select(
            *keys,
            func.avg(Score.value).label("mean"),
            func.min(Score.value).label("min"),
            func.max(Score.value).label("max"),
            func.count(Score.id).label("count"),
            func.max(Score.created_at).label("latest_at"),
        ),
        team,
        flt,
    )
    query = query.group_by(*[COLUMNS[name] for name in group_by]).order_by(func.max(Score.id).desc()).limit(limit)
    return [dict(row._mapping) for row in session.execute(query)]


def job_scores(session: Session, job: Job) -> list[Score]:
    return list(session.scalars(select(Score).where(Score.job_id == job.id).order_by(Score.id)))


def team_labels(session: Session, team: Team) -> list[tuple[str, str]]:
    """Every label (key, value) on the team's jobs, for pickers."""
    query = (
        select(JobLabel.key, JobLabel.value)
        .join(Job, Job.id == JobLabel.job_id)
        .where(Job.team_id == team.id)
        .distinct()
        .order_by(JobLabel.key, JobLabel.value)
    )
    return [(key, value) for key, value in session.execute(query)]


def paired_scores(
    session: Session, team: Team, flt: ResultFilter, x: tuple[str, str], y: tuple[str, str], group: str
) -> list[dict[str, Any]]:
    """One point per (job, model) that has both the `x` and the `y` (task, metric) score: {job_id, model, group,
    x, y}; `group` is a column of COLUMNS (the color of the point)."""
    query = _where(select(Score.job_id, Score.model, Score.task, Score.metric, Score.value, COLUMNS[group]), team, flt)
    query = query.where(Score.task.in_([x[0], y[0]]), Score.metric.in_([x[1], y[1]]))
    points: dict[tuple[str, str], dict[str, Any]] = {}
    for job_id, model, task, metric, value, group_value in session.execute(query):
        point = points.setdefault((job_id, model), {"job_id": job_id, "model": model, "group": group_value})
        if (task, metric) == x:
            point["x"] = value
        if (task, metric) == y:
            point["y"] = value
    return [point for point in points.values() if "x" in point and "y" in point]
