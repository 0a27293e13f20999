"""One router per resource, aggregated here."""

from fastapi import APIRouter

from api.routes import artifacts, files, health, jobs, models, results

v1 = APIRouter(prefix="/v1")
for module in (files, jobs, artifacts, results, models):
    v1.include_router(module.router)

__all__ = ["health", "v1"]
