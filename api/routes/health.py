"""Liveness, readiness and Prometheus metrics (outside /v1, no API key)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from langadapt.api.deps import ServicesDep
from langadapt.api.errors import error_response
from langadapt.api.schemas import ErrorBody
from langadapt.jobs.execution import live_workers
from langadapt.jobs.queue import GPU_ROLES

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody, "description": "a dependency is down"}})
def readyz(services: ServicesDep) -> JSONResponse:
    """Ready when the database, the broker and the artifact storage all answer and a worker serving the GPU queue
    has recorded that it is alive within the last three beat intervals."""
    checks: dict[str, str] = {}
    try:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with services.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        services.store.ping()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unavailable: {type(exc).__name__}"
    settings = services.settings
    try:
        with services.sessions() as session:
            gpu_queues = [settings.queue(role) for role in GPU_ROLES]
            alive = live_workers(session, gpu_queues, 3 * settings.worker_beat_interval_s)
        checks["gpu_worker"] = "ok" if alive else "no GPU worker alive"
    except Exception as exc:
        checks["gpu_worker"] = f"unavailable: {type(exc).__name__}"
    failing = [f"{name} ({state})" for name, state in checks.items() if state != "ok"]
    if failing:
        error = {"code": "not_ready", "message": f"not ready: {', '.join(failing)}", "param": None}
        return JSONResponse({"error": error, "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"model": ErrorBody, "description": "token needed"}},
)
def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus text format. With LANGADAPT_METRICS_TOKEN set, scrapers must send it as a bearer token."""
    token = services.settings.metrics_token
    if token:
        sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), token.encode()):
            return error_response(401, "invalid_metrics_token", "send 'Authorization: Bearer <metrics token>'")
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
