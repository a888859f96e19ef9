"""The dashboard: server-rendered pages, the same data as JSON, and a browser login.

The page is rendered here (Jinja2); api/static/dashboard.js follows the event stream and swaps in
/dashboard/panels when something changes. A browser logs in once with an API token and gets a
session cookie (controller/services/browser_sessions.py) that only ever reads, as a viewer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import (
    HostPingsDep,
    LoginRequired,
    SessionDep,
    SettingsDep,
    client_address,
    get_failed_auth,
    get_service,
    requires,
)
from api.pause_chart import pause_chart
from api.schemas import DashboardPublic
from controller.hosts.host_pings import HostPings
from controller.services.browser_sessions import (
    MAX_SECRET_LENGTH,
    SESSION_COOKIE,
    SESSION_LIFETIME,
    open_session,
)
from controller.services.dashboard import Dashboard, read_dashboard
from controller.services.tokens import Role
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import Host, utcnow

router = APIRouter(tags=["dashboard"])
HERE = Path(__file__).resolve().parent.parent
STATIC = HERE / "static"
PING_TIMEOUT_SECONDS = 1.0
# Scripts and styles from this service only; inline style attributes (bar widths) are allowed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HTML: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}, "description": "An HTML page"}
}
LOGIN_FORM: dict[int | str, dict[str, Any]] = {
    401: {"content": {"text/html": {}}, "description": "The login form"}
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _clock(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%H:%M:%S")


def _stamp(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.filters["clock"] = _clock
templates.filters["stamp"] = _stamp


def _page(
    template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> HTMLResponse:
    html = templates.get_template(template).render(**context)
    headers = {"Content-Security-Policy": CSP} | (headers or {})
    return HTMLResponse(html, status_code=status, headers=headers)


def _unreachable(session: Session, pings: HostPings) -> set[str]:
    """Hosts whose libvirt does not answer now (the same pings /healthz uses)."""
    hosts = [(h.name, h.uri) for h in session.scalars(select(Host).order_by(Host.name))]
    status = pings.ping_all(hosts, timeout=PING_TIMEOUT_SECONDS)
    return {name for name, answer in status.items() if answer != "ok"}


def _read(session: Session, settings: Settings, pings: HostPings) -> Dashboard:
    return read_dashboard(
        session,
        pause_budget_seconds=settings.maintenance.pause_budget_seconds,
        unreachable=_unreachable(session, pings),
    )


def _panels(board: Dashboard) -> dict[str, Any]:
    return {
        "board": board,
        "chart": pause_chart(board.pause_history, budget_seconds=board.pause_budget_seconds),
        "now": utcnow(),
    }


@router.get("/api/v1/dashboard", response_model=DashboardPublic, **requires(Role.VIEWER))
def dashboard_data(session: SessionDep, settings: SettingsDep, pings: HostPingsDep) -> Dashboard:
    """What the dashboard shows: hosts, open jobs, the latest job's guests, recent pauses, events."""
    return _read(session, settings, pings)


@router.get(
    "/dashboard",
    response_class=HTMLResponse,
    responses=HTML | LOGIN_FORM,
    **requires(Role.VIEWER, login_form=True),
)
def dashboard_page(
    request: Request, session: SessionDep, settings: SettingsDep, pings: HostPingsDep
) -> HTMLResponse:
    """The dashboard page; live through the event stream. Without a session, the login form."""
    board = _read(session, settings, pings)
    return _page(
        "dashboard.html",
        **_panels(board),
        session=SESSION_COOKIE in request.cookies,
    )


@router.get(
    "/dashboard/panels",
    response_class=HTMLResponse,
    responses=HTML | LOGIN_FORM,
    **requires(Role.VIEWER, login_form=True),
)
def dashboard_panels(
    session: SessionDep, settings: SettingsDep, pings: HostPingsDep
) -> HTMLResponse:
    """The page's panels alone, which the page swaps in when an event arrives."""
    return _page("panels.html", **_panels(_read(session, settings, pings)))


@router.get("/dashboard/login", response_class=HTMLResponse, responses=HTML, **requires(None))
def login_form() -> HTMLResponse:
    """The login form: paste an API token once (any role; the session can only read)."""
    return _page("login.html")


LOGIN_BODY = {
    "required": True,
    "content": {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "properties": {
                    "token": {"type": "string", "minLength": 1, "maxLength": MAX_SECRET_LENGTH}
                },
                "required": ["token"],
            }
        }
    },
}


@router.post(
    "/dashboard/login",
    status_code=303,
    response_class=RedirectResponse,
    responses={
        303: {"description": "Logged in: the session cookie is set; on to /dashboard"},
        401: {"content": {"text/html": {}}, "description": "Wrong token: the form again"},
        429: {"content": {"text/html": {}}, "description": "Too many wrong tokens from here"},
        403: {"content": {"text/html": {}}, "description": "Posted from another site"},
        422: {"content": {"text/html": {}}, "description": "No token given: the form again"},
    },
    openapi_extra=requires(None)["openapi_extra"] | {"requestBody": LOGIN_BODY},
)
async def login(request: Request) -> Response:
    """Trade an API token for a session cookie (HttpOnly, SameSite=Strict) that only reads."""
    if not _same_origin(request):
        return _page("login.html", 403, error="Log in from the dashboard's own page.")
    form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
    token = form.get("token", "").strip()
    if not token or len(token) > MAX_SECRET_LENGTH:
        return _page("login.html", 422, error="Paste an API token.")
    throttle, source = get_failed_auth(request), client_address(request)
    wait = throttle.retry_after(source)
    if wait is not None:
        return _page(
            "login.html",
            429,
            {"Retry-After": str(wait)},
            error=f"Too many wrong tokens from here: try again in {wait} s.",
        )
    service = get_service(request)
    opened = await run_in_threadpool(_open, service.ctx.session_factory, service.session_key, token)
    if opened is None:
        throttle.failed(source)
        return _page(
            "login.html",
            401,
            {"WWW-Authenticate": "Bearer"},
            error="That token is unknown or revoked.",
        )
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        opened,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post(
    "/dashboard/logout",
    status_code=303,
    response_class=RedirectResponse,
    responses={
        303: {"description": "The session cookie is cleared; on to the login form"},
        403: {"content": {"text/html": {}}, "description": "Posted from another site"},
    },
    **requires(None),
)
def logout(request: Request) -> Response:
    """Forget the session cookie (only when asked from the dashboard's own page)."""
    if not _same_origin(request):
        return _page("login.html", 403, error="Log out from the dashboard's own page.")
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


def _open(session_factory: sessionmaker[Session], key: bytes, token: str) -> str | None:
    with unit_of_work(session_factory, read_only=True) as s:
        opened = open_session(s, token, key=key, now=utcnow())
    return None if opened is None else opened[1]


def _same_origin(request: Request) -> bool:
    """A login or logout posted from another site is refused (no CSRF). A browser that says
    where the request comes from (Sec-Fetch-Site) is believed: it sends `Origin: null` on our
    own form, since every page says Referrer-Policy: no-referrer. Otherwise the Origin must be
    this server; a client that sends neither (curl, a script) is not a browser being abused."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _static(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type)


@router.get(
    "/dashboard/dashboard.js",
    response_class=Response,
    responses={200: {"content": {"text/javascript": {}}, "description": "The page's script"}},
    **requires(None),
)
def dashboard_script() -> Response:
    """The page's script: follows the event stream and refreshes the panels."""
    return _static("dashboard.js", "text/javascript")


@router.get(
    "/dashboard/dashboard.css",
    response_class=Response,
    responses={200: {"content": {"text/css": {}}, "description": "The page's styles"}},
    **requires(None),
)
def dashboard_styles() -> Response:
    """The page's styles."""
    return _static("dashboard.css", "text/css")


def install(app: FastAPI) -> None:
    """The routes, and the login form as the answer to a page's 401."""
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> HTMLResponse:
        return _page(
            "login.html",
            401,
            {"WWW-Authenticate": "Bearer"},
            error=None,
            expired=SESSION_COOKIE in request.cookies,
        )
