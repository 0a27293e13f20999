"""The FastAPI application factory: `create_app(settings)` builds the engine, store and Celery client once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from langadapt.api import dashboard, errors, metrics
from langadapt.api.headers import HeaderLimitMiddleware
from langadapt.api.routes import ROUTERS
from langadapt.api.streams import DatabaseSlots, EventWatcher, StreamGate
from langadapt.jobs.db import check_migrated
from langadapt.jobs.runtime import build_services
from langadapt.jobs.settings import Settings
from langadapt.jobs.storage import StorageUnavailable

log = logging.getLogger("langadapt.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    services = build_services(settings)

    slots = DatabaseSlots(settings.api_db_slots, settings.api_db_wait_s)
    watcher = EventWatcher(services.sessions, slots, interval_s=0.5)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        check_migrated(services.engine)  # refuse to serve an unmigrated database
        try:
            services.store.ensure_ready()
        except StorageUnavailable as exc:  # serve anyway: /readyz reports it and uploads answer 503 until it is back
            log.warning("artifact storage unavailable at start-up: %s", exc)
        # Threads for every database slot plus those that never touch the database (health, file reads).
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.api_db_slots + 8)
        yield
        await watcher.close()
        services.engine.dispose()

    # /docs and /redoc with their assets served from the installed package: they work without internet.
    app = FastAPIOffline(
        title="langadapt",
        version="0.1.0",
        description="Managed language adaptation jobs: vocabulary, embedding init, CPT, LEP, calibration, eval.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.db_slots, app.state.event_watcher = slots, watcher
    app.state.stream_gate = StreamGate(settings.max_event_streams, settings.max_event_streams_per_team)
    app.state.registry, latency = metrics.new_registry(services.sessions)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes)
    app.add_middleware(metrics.LatencyMiddleware, latency=latency)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    dashboard.install(app)
    return app
