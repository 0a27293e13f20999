"""One router per resource; each carries its full path prefix (`/v1/...`, health at the root)."""

from langadapt.api.routes import artifacts, files, health, jobs, models, results, usage, webhooks

ROUTERS = [
    health.router,
    files.router,
    jobs.router,
    artifacts.router,
    results.router,
    models.router,
    webhooks.router,
    usage.router,
]
