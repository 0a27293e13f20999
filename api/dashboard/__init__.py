"""The team dashboard at /dashboard: sign in with an API key, the team's jobs, a job's curves, scores and
artifacts, results compared across runs. Server-rendered; its one stylesheet is served from the package."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from langadapt.api.dashboard.routes import router
from langadapt.api.dashboard.session import SignInRequired


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=Path(__file__).with_name("static")), name="dashboard-static")

    @app.exception_handler(SignInRequired)
    async def sign_in(_: Request, __: SignInRequired) -> Response:
        return RedirectResponse("/dashboard/login", status_code=303)
