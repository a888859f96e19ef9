"""Dependencies: database sessions, settings, the service and its runtime, and authorization.

Authorization is deny-by-default: one app-wide dependency reads the role each route declares with
requires(); a route that declares none answers 403 to everybody, and tests/api walks the
OpenAPI spec to prove every route declares one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth_throttle import FailedAuth
from controller.cycle.runtime import Runtime
from controller.daemon.scheduler import MaintenanceScheduler
from controller.daemon.service import Service
from controller.hosts.host_pings import HostPings
from controller.services.browser_sessions import SESSION_COOKIE, session_principal
from controller.services.tokens import Principal, Role, TokenUses, authenticate
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import utcnow

ROLE_KEY = "x-required-role"
LOGIN_FORM_KEY = "x-login-form"
# A public route that also tells who calls it when a token comes along (/healthz: details).
IDENTIFY_KEY = "x-identifies-callers"
PUBLIC = "none"
ANONYMOUS = Principal("anonymous", Role.ADMIN)  # only when auth is off, which only loopback allows
# A route that also answers, without a token, the addresses in [server] metrics_allow.
SCRAPER_KEY = "x-allow-scraper-addresses"
SCRAPER = Principal("scraper", Role.VIEWER)
# A browser session cookie counts only on these: a cross-site request can never make it write.
READ_METHODS = ("GET", "HEAD")

bearer = HTTPBearer(auto_error=False, description="An API token: maintctl token create")


def requires(
    role: Role | None, *, login_form: bool = False, identify: bool = False
) -> dict[str, Any]:
    """Route kwargs that declare who may call it; None means public (healthz, the login form). A
    page for browsers asks for login_form: its 401 is the login form (LoginRequired) instead of
    a problem. A public route may identify: a token sent along is checked (401 if wrong) and its
    principal handed to the route (CallerDep); without one the caller is None."""
    extra: dict[str, Any] = {ROLE_KEY: PUBLIC if role is None else role.value}
    if login_form:
        extra[LOGIN_FORM_KEY] = True
    if identify:
        extra[IDENTIFY_KEY] = True
    return {"openapi_extra": extra}


class LoginRequired(HTTPException):
    """A 401 on a page for browsers; api/routes/dashboard.py answers it with the login form."""


def requires_viewer_or_scraper() -> dict[str, Any]:
    """Route kwargs: a viewer token, or no token from an address in [server] metrics_allow."""
    return {"openapi_extra": {ROLE_KEY: Role.VIEWER.value, SCRAPER_KEY: True}}


def _allowed_scraper(request: Request, settings: Settings) -> bool:
    allow = settings.server.metrics_allow
    if not allow or request.client is None:
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(address in network for network in allow)


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def get_ctx(request: Request) -> Runtime:
    return get_service(request).ctx


def get_scheduler(request: Request) -> MaintenanceScheduler:
    return get_service(request).scheduler


def get_host_pings(request: Request) -> HostPings:
    return get_service(request).host_pings


def get_token_uses(request: Request) -> TokenUses:
    return get_service(request).token_uses


def get_settings(request: Request) -> Settings:
    return get_ctx(request).settings


def get_session(request: Request) -> Iterator[Session]:
    """A GET reads only (tests/api/test_reads_never_write.py): it never waits for a writer."""
    read_only = request.method in ("GET", "HEAD")
    with unit_of_work(get_ctx(request).session_factory, read_only=read_only) as session:
        yield session


def authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    route = request.scope.get("route")
    extra = getattr(route, "openapi_extra", None) or {}
    required = extra.get(ROLE_KEY)
    if required is None:
        raise HTTPException(403, "this route declares no role: denied by default")
    request.state.caller = None
    if required == PUBLIC:
        request.state.principal = ANONYMOUS
        if extra.get(IDENTIFY_KEY) and (credentials is not None or not _auth_on(request)):
            request.state.caller = _identify(request, credentials, HTTPException)
        return
    if not _auth_on(request):
        request.state.principal = request.state.caller = ANONYMOUS
        return
    if extra.get(SCRAPER_KEY) and _allowed_scraper(request, get_settings(request)):
        request.state.principal = SCRAPER
        return
    unauthenticated = LoginRequired if extra.get(LOGIN_FORM_KEY) else HTTPException
    principal = _identify(request, credentials, unauthenticated)
    if not principal.role.allows(Role(required)):
        raise HTTPException(403, f"role {principal.role.value} may not do this; needs {required}")
    request.state.principal = request.state.caller = principal


def _auth_on(request: Request) -> bool:
    return get_settings(request).server.auth


def _identify(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    unauthenticated: type[HTTPException],
) -> Principal:
    """The principal of a bearer token, or of a session cookie on a read; 401 otherwise."""
    ctx = get_ctx(request)
    if not ctx.settings.server.auth:
        return ANONYMOUS
    challenge = {"WWW-Authenticate": "Bearer"}
    cookie = request.cookies.get(SESSION_COOKIE)
    session_read = credentials is None and cookie and request.method in READ_METHODS
    if not session_read and (credentials is None or credentials.scheme.lower() != "bearer"):
        raise unauthenticated(401, "missing bearer token", headers=challenge)
    throttle, source = get_failed_auth(request), client_address(request)
    wait = throttle.retry_after(source)
    if wait is not None:
        raise HTTPException(
            429,
            f"too many failed authentications from {source}: retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    if session_read:
        assert cookie is not None
        principal = _session_principal(ctx, get_service(request).session_key, cookie)
        if principal is None:
            throttle.failed(source)
            raise unauthenticated(401, "the session expired or its token was revoked: log in")
    else:
        assert credentials is not None
        with unit_of_work(ctx.session_factory, read_only=True) as s:
            principal = authenticate(s, credentials.credentials)
        if principal is None:
            throttle.failed(source)
            raise unauthenticated(401, "invalid or revoked token", headers=challenge)
    get_token_uses(request).note(principal, utcnow())  # written later, off the request path
    return principal


def client_address(request: Request) -> str:
    """The caller's address: the peer, or the client a [server] trusted_proxies peer names."""
    return request.client.host if request.client else "unknown"


def get_failed_auth(request: Request) -> FailedAuth:
    throttle: FailedAuth = request.app.state.failed_auth
    return throttle


def _session_principal(ctx: Runtime, key: bytes, cookie: str) -> Principal | None:
    """A dashboard session (controller/services/browser_sessions.py): a viewer, reads only."""
    with unit_of_work(ctx.session_factory, read_only=True) as s:
        return session_principal(s, cookie, key=key, now=utcnow())


def get_principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


def get_caller(request: Request) -> Principal | None:
    """Who called, on a route that identifies callers; None: nobody said."""
    caller: Principal | None = getattr(request.state, "caller", None)
    return caller


# scope="function": the commit runs before the response is sent, so a failed commit answers
# 503 instead of following a 2xx the client already has.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CtxDep = Annotated[Runtime, Depends(get_ctx)]
SchedulerDep = Annotated[MaintenanceScheduler, Depends(get_scheduler)]
HostPingsDep = Annotated[HostPings, Depends(get_host_pings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
CallerDep = Annotated[Principal | None, Depends(get_caller)]
