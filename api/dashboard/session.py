"""Dashboard sign-in: an API key, typed once into a form, becomes a signed session cookie (HttpOnly,
SameSite=Strict, Secure over https) that names the key's id, never the key; every page re-checks that the key is
not revoked. Forms carry a CSRF token bound to the session (the login form: to a short-lived login cookie)."""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from langadapt.api.deps import SessionDep, SettingsDep
from langadapt.jobs.errors import ServiceError
from langadapt.jobs.models import ApiKey, Team
from langadapt.jobs.settings import Settings
from langadapt.jobs.teams import hash_key

SESSION_COOKIE = "langadapt_session"
LOGIN_COOKIE = "langadapt_login"
SESSION_S = 12 * 3600
LOGIN_S = 1800
PATH = "/dashboard"


class SignInRequired(Exception):
    """No valid session: the page redirects to the sign-in form."""


class CsrfRejected(ServiceError):
    status = 403
    code = "csrf_token_invalid"


@dataclass(frozen=True)
class DashboardSession:
    team: Team
    key_id: str
    csrf: str


def secret_key(settings: Settings) -> str:
    """LANGADAPT_DASHBOARD_SECRET, else a random key kept in the service's home (shared by its API processes)."""
    if settings.dashboard_secret:
        return settings.dashboard_secret
    path = os.path.join(settings.home_path, "dashboard_secret")
    if not os.path.exists(path):
        os.makedirs(settings.home_path, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another API process wrote it first
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def _serializer(settings: Settings, purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key(settings), salt=f"langadapt-dashboard-{purpose}")


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def start_session(response: Response, request: Request, settings: Settings, key: ApiKey) -> None:
    token = _serializer(settings, "session").dumps({"key": key.id, "csrf": secrets.token_urlsafe(24)})
    _set_cookie(response, request, SESSION_COOKIE, token, SESSION_S)
    response.delete_cookie(LOGIN_COOKIE, path=PATH)


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=PATH)


def set_login_cookie(response: Response, request: Request, settings: Settings, token: str) -> None:
    """The sign-in form's CSRF token goes in the form and, signed, in a cookie: the POST must bring both."""
    _set_cookie(response, request, LOGIN_COOKIE, _serializer(settings, "login").dumps(token), LOGIN_S)


def check_login_token(request: Request, settings: Settings, sent: str) -> None:
    try:
        expected = _serializer(settings, "login").loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=LOGIN_S)
    except BadSignature:
        raise CsrfRejected("the sign-in form expired; reload it") from None
    if not hmac.compare_digest(str(expected), sent):
        raise CsrfRejected("the sign-in form expired; reload it")


def current_session(request: Request, session: SessionDep, settings: SettingsDep) -> DashboardSession:
    try:
        data = _serializer(settings, "session").loads(request.cookies.get(SESSION_COOKIE, ""), max_age=SESSION_S)
    except BadSignature:
        raise SignInRequired from None
    key = session.get(ApiKey, data["key"])
    if key is None or key.revoked_at is not None:
        raise SignInRequired
    team = session.get(Team, key.team_id)
    assert team is not None
    return DashboardSession(team=team, key_id=key.id, csrf=data["csrf"])


Signed = Annotated[DashboardSession, Depends(current_session)]


def check_csrf(signed: DashboardSession, sent: str) -> None:
    if not hmac.compare_digest(signed.csrf, sent):
        raise CsrfRejected("invalid form token; reload the page")


def key_by_value(session: Session, key: str) -> ApiKey | None:
    """The unrevoked key row for a key typed into the sign-in form."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None)))
