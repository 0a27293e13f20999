"""The FastAPI application factory: `create_app(settings)` builds the engine, store and Celery client once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors, metrics
from api.deps import Services
from api.routes import health, v1
from jobs.db import check_migrated, make_engine, make_sessionmaker
from jobs.queue import celery_app
from jobs.settings import Settings
from jobs.storage import open_store


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
        services.store.ensure_ready()
        yield
        services.engine.dispose()

    app = FastAPI(
        title="langadapt",
        version="0.1.0",
        description="Managed language adaptation jobs: vocabulary, embedding init, CPT, LEP, calibration, eval.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.registry = metrics.install(app, services.sessions)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(v1)
    return app
