"""The FastAPI application factory: `create_app(settings)` builds the engine, store and Celery client once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors, metrics
from api.deps import Services
from api.routes import ROUTERS
from jobs.db import check_migrated, make_engine, make_sessionmaker
from jobs.queue import celery_app
from jobs.settings import Settings
from jobs.storage import StorageUnavailable, open_store

log = logging.getLogger("langadapt.api")


def build_services(settings: Settings) -> Services:
    engine = make_engine(settings.database)
    store = open_store(
        settings.storage,
        endpoint=settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
        public_endpoint=settings.s3_public_endpoint,
    )
    return Services(
        settings=settings, engine=engine, sessions=make_sessionmaker(engine), store=store, celery=celery_app(settings)
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        check_migrated(services.engine)  # refuse to serve an unmigrated database
        try:
            services.store.ensure_ready()
        except StorageUnavailable as exc:  # serve anyway: /readyz reports it and uploads answer 503 until it is back
            log.warning("artifact storage unavailable at start-up: %s", exc)
        yield
        services.engine.dispose()

    app = FastAPI(
        title="langadapt",
        version="0.1.0",
        description="Managed language adaptation jobs: vocabulary, embedding init, CPT, LEP, calibration, eval.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.registry, latency = metrics.new_registry(services.sessions)
    app.add_middleware(metrics.LatencyMiddleware, latency=latency)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
