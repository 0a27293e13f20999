from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from langadapt.api.deps import CurrentTeam, SessionDep
from langadapt.api.routes.pagination import Limit, parse_labels
from langadapt.api.schemas import ERROR_RESPONSES, ResultGroup, ResultGroupsPublic, ResultPublic, ResultsPublic
from langadapt.core.adaptation.config import INT64_MAX
from langadapt.jobs.errors import Invalid
from langadapt.jobs.results import ALWAYS_GROUPED, COLUMNS, ResultFilter, group_keys, group_results, list_results

router = APIRouter(prefix="/v1/results", tags=["results"], responses=ERROR_RESPONSES)

Text = Annotated[str | None, Query(max_length=500)]


@router.get("", response_model=ResultsPublic | ResultGroupsPublic)
def read_results(
    team: CurrentTeam,
    session: SessionDep,
    task: Text = None,
    metric: Text = None,
    model: Text = None,
    variant: Text = None,
    vocab_method: Text = None,
    init_method: Text = None,
    base_model: Text = None,
    instruct_model: Text = None,
    job_id: Text = None,
    label: Annotated[list[str], Query(description="key:value, repeatable")] = [],  # noqa: B006
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: Annotated[
        str | None,
        Query(
            description=f"comma-separated: {', '.join(COLUMNS)}; {', '.join(ALWAYS_GROUPED)} are always part of a "
            "group (a mean never mixes tasks, metrics or models)"
        ),
    ] = None,
    limit: Limit = 50,
    after: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
) -> Any:
    """Score rows joined with their job's parameters, newest first; with `group_by`, one aggregate per group."""
    equals = {
        "task": task,
        "metric": metric,
        "model": model,
        "variant": variant,
        "vocab_method": vocab_method,
        "init_method": init_method,
        "base_model": base_model,
        "instruct_model": instruct_model,
        "job_id": job_id,
    }
    flt = ResultFilter(
        equals={k: v for k, v in equals.items() if v is not None},
        labels=parse_labels(label),
        since=_utc(since, "since"),
        until=_utc(until, "until"),
    )
    if group_by:
        names = [name.strip() for name in group_by.split(",") if name.strip()]
        unknown = [name for name in names if name not in COLUMNS]
        if unknown or not names:
            raise Invalid(f"group_by: unknown column(s) {unknown} (choose from {', '.join(COLUMNS)})", param="group_by")
        groups = group_results(session, team, flt, names, limit=limit)
        return ResultGroupsPublic(
            data=[
                ResultGroup(
                    key={name: group[name] for name in group_keys(names)},
                    mean=group["mean"],
                    min=group["min"],
                    max=group["max"],
                    count=group["count"],
                    latest_at=group["latest_at"],
                )
                for group in groups
            ]
        )
    rows, cursor = list_results(session, team, flt, after=after, limit=limit)
    return ResultsPublic(data=[ResultPublic.join(score, job) for score, job in rows], next=cursor)


def _utc(value: datetime | None, param: str) -> datetime | None:
    """The time in UTC (a time without a zone is UTC); a time whose UTC date is outside years 1-9999 is a 422."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise Invalid(f"{param} is out of range once converted to UTC", param=param) from None
