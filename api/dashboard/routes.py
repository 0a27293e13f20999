"""The team dashboard's pages: jobs, one job, results. Server-rendered (Jinja2 templates, inline SVG charts, one
stylesheet shipped in the package); every query is scoped to the signed-in team."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from langadapt.api.dashboard import charts
from langadapt.api.dashboard.session import (
    Signed,
    check_csrf,
    check_login_token,
    end_session,
    key_by_value,
    set_login_cookie,
    start_session,
)
from langadapt.api.deps import ServicesDep, SessionDep, SettingsDep
from langadapt.api.routes.artifacts import artifact_response
from langadapt.api.routes.pagination import parse_labels
from langadapt.jobs import service
from langadapt.jobs.execution import artifacts_of
from langadapt.jobs.models import RETRYABLE, TERMINAL, JobEvent, JobStatus
from langadapt.jobs.queue import dispatch
from langadapt.jobs.results import ResultFilter, group_results, job_scores, paired_scores, team_labels
from langadapt.jobs.settings import Settings

router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(
    env=Environment(
        loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape(default=True)
    )
)

PAGE = 50
GROUPS = ("vocab_method", "init_method", "variant")
COST = ("symbols_per_token", "target")  # Russian (target) chars per token: lower cost per character
QUALITY = ("bits_per_char", "target")


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep) -> Response:
    return _login_page(request, settings, error=None)


def _login_page(request: Request, settings: Settings, *, error: str | None, status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    page = _page(request, "login.html", {"error": error, "csrf": token}, status_code)
    set_login_cookie(page, request, settings, token)
    return page


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=200)],
    csrf: Annotated[str, Form(max_length=200)],
) -> Response:
    """The key travels in the POST body only, never in a URL; the cookie names the key's id, not the key."""
    check_login_token(request, settings, csrf)
    key = key_by_value(session, api_key)
    if key is None:
        return _login_page(request, settings, error="invalid or revoked API key", status_code=401)
    response = RedirectResponse("/dashboard", status_code=303)
    start_session(response, request, settings, key)
    return response


@router.post("/logout")
def logout(signed: Signed, csrf: Annotated[str, Form(max_length=200)]) -> Response:
    check_csrf(signed, csrf)
    response = RedirectResponse("/dashboard/login", status_code=303)
    end_session(response)
    return response


@router.get("", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    signed: Signed,
    session: SessionDep,
    status: Annotated[JobStatus | None, Query()] = None,
    label: Annotated[str, Query(max_length=300)] = "",
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    labels = parse_labels([label]) if label else []
    jobs, cursor = service.list_jobs(session, signed.team, after=after, limit=PAGE, status=status, labels=labels)
    context = {
        "signed": signed,
        "jobs": jobs,
        "next": cursor,
        "status": status.value if status else "",
        "label": label,
        "statuses": [s.value for s in JobStatus],
        "labels": [f"{k}:{v}" for k, v in team_labels(session, signed.team)],
        "live": any(job.status not in TERMINAL for job in jobs),
    }
    return _page(request, "jobs.html", context)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, signed: Signed, session: SessionDep) -> Response:
    job = service.get_job(session, signed.team, job_id)
    events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)))
    cpt = [e.data for e in events if e.type == "metrics" and e.stage == "cpt" and e.data]
    scores = job_scores(session, job)
    models = list(dict.fromkeys(score.model for score in scores))
    table: dict[tuple[str, str], dict[str, float]] = {}
    for score in scores:
        table.setdefault((score.task, score.metric), {})[score.model] = score.value
    context = {
        "signed": signed,
        "job": job,
        "timeline": _timeline(events),
        "loss": charts.line_chart(
            [(d["step"], d["loss"]) for d in cpt if d.get("loss") is not None], x_label="step", y_label="loss"
        ),
        "speed": charts.line_chart(
            [(d["step"], d["tokens_per_s"]) for d in cpt if d.get("tokens_per_s")], x_label="step", y_label="tokens/s"
        ),
        "models": models,
        "scores": table,
        "artifacts": artifacts_of(session, job.id),
        "cancellable": job.status in (JobStatus.queued, JobStatus.running),
        "retryable": job.status in RETRYABLE,
        "live": job.status not in TERMINAL,
        "messages": [e for e in events if e.type == "message"][-20:],
    }
    return _page(request, "job.html", context)


def _timeline(events: list[JobEvent]) -> list[dict[str, Any]]:
    """Stages in order with how long each took (still running: since it started)."""
    stages: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.type != "stage" or event.stage is None:
            continue
        entry = stages.setdefault(event.stage, {"stage": event.stage, "started": event.ts, "seconds": None})
        if event.message.startswith("done in"):
            entry["seconds"] = float(event.message.split()[2])
        elif event.message.startswith("complete output found"):
            entry["seconds"], entry["skipped"] = 0.0, True
    longest = max([s["seconds"] or 0.0 for s in stages.values()] + [1e-9])
    for entry in stages.values():
        entry["width"] = round(100 * (entry["seconds"] or 0.0) / longest, 1)
    return list(stages.values())


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, signed: Signed, session: SessionDep, csrf: Annotated[str, Form(max_length=200)]) -> Response:
    check_csrf(signed, csrf)
    service.cancel_job(session, signed.team, job_id)
    return RedirectResponse(f"/dashboard/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/retry")
def retry(
    job_id: str, signed: Signed, session: SessionDep, services: ServicesDep, csrf: Annotated[str, Form(max_length=200)]
) -> Response:
    check_csrf(signed, csrf)
    job = service.retry_job(session, signed.team, job_id)
    dispatch(session, services.celery, job.id, services.settings)
    return RedirectResponse(f"/dashboard/jobs/{job_id}", status_code=303)


@router.api_route("/jobs/{job_id}/artifacts/{name:path}", methods=["GET", "HEAD"])
def download(
    request: Request,
    job_id: str,
    name: str,
    signed: Signed,
    session: SessionDep,
    services: ServicesDep,
) -> Response:
    job = service.get_job(session, signed.team, job_id)
    return artifact_response(job, name, request, session, services)


@router.get("/results", response_class=HTMLResponse)
def results_page(
    request: Request,
    signed: Signed,
    session: SessionDep,
    label: Annotated[str, Query(max_length=300)] = "",
    group: Annotated[str, Query(pattern="^(vocab_method|init_method|variant)$")] = "vocab_method",
) -> Response:
    flt = ResultFilter(labels=parse_labels([label]) if label else [])
    groups = group_results(session, signed.team, flt, [group], limit=500)
    by_measure: dict[tuple[str, str], list[tuple[str, str, float]]] = {}
    for row in groups:
        series = f"{row[group] or '-'}"
        by_measure.setdefault((row["task"], row["metric"]), []).append((series, row["model"], row["mean"]))
    bars = [
        {"task": task, "metric": metric, "chart": charts.bar_chart(values, y_label=f"{task} / {metric}")}
        for (task, metric), values in sorted(by_measure.items())
    ]
    points = paired_scores(session, signed.team, flt, COST, QUALITY, group)
    scatter = charts.scatter(
        [(p["x"], p["y"], str(p["group"] or "-"), f"{p['job_id']} {p['model']}") for p in points],
        x_label="Russian chars per token (higher: cheaper)",
        y_label="bits per char (lower: better)",
    )
    context = {
        "signed": signed,
        "label": label,
        "group": group,
        "groups": GROUPS,
        "labels": [f"{k}:{v}" for k, v in team_labels(session, signed.team)],
        "bars": bars,
        "scatter": scatter,
        "points": len(points),
    }
    return _page(request, "results.html", context)
