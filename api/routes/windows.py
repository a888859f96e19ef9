from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import ValidationError

from api.deps import PrincipalDep, SessionDep, SettingsDep, requires
from api.schemas import FreezePublic, WindowCreate, WindowPublic
from controller.errors import InvalidRequest
from controller.services import windows as window_service
from controller.services.tokens import Role
from controller.settings import WindowConfig
from controller.store.models import utcnow

router = APIRouter(prefix="/api/v1", tags=["windows"])


def _public(view: window_service.WindowView) -> WindowPublic:
    c = view.config
    return WindowPublic(
        name=c.name,
        source=view.source,
        cron=c.cron,
        timezone=c.timezone,
        duration_minutes=c.duration_minutes,
        hosts=c.hosts,
        selector=c.selector,
        job=None if c.job is None else c.job.model_dump(mode="json"),
        next_openings=[o.start.isoformat() for o in view.next_openings],
    )


@router.get("/windows", response_model=list[WindowPublic], **requires(Role.VIEWER))
def list_windows(session: SessionDep, settings: SettingsDep) -> list[WindowPublic]:
    """Maintenance windows (config file and API), each with its next three openings."""
    return [_public(v) for v in window_service.list_windows(session, settings, now=utcnow())]


@router.post("/windows", response_model=WindowPublic, status_code=201, **requires(Role.ADMIN))
def add_window(
    body: WindowCreate, session: SessionDep, settings: SettingsDep, who: PrincipalDep
) -> WindowPublic:
    """Declare a maintenance window (admin)."""
    try:
        config = WindowConfig(**body.model_dump())
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise InvalidRequest(problems) from None
    window_service.add_window(session, settings, config, actor=who.name)
    views = window_service.list_windows(session, settings, now=utcnow())
    return _public(next(v for v in views if v.config.name == config.name))


@router.delete("/windows/{name}", status_code=204, response_class=Response, **requires(Role.ADMIN))
def delete_window(
    name: str, session: SessionDep, settings: SettingsDep, who: PrincipalDep
) -> Response:
    """Remove a window added through the API, unless a job that has not ended names it (admin)."""
    window_service.remove_window(session, settings, name, actor=who.name)
    return Response(status_code=204)


@router.get("/freezes", response_model=list[FreezePublic], **requires(Role.VIEWER))
def list_freezes(settings: SettingsDep) -> list[FreezePublic]:
    """Freezes (blackout periods) from the config file: no job starts on their hosts meanwhile."""
    now = utcnow()
    return [
        FreezePublic(
            name=f.name,
            start=f.start,
            end=f.end,
            reason=f.reason,
            hosts=f.hosts,
            selector=f.selector,
            active=f.start <= now < f.end,
        )
        for f in sorted(settings.freezes, key=lambda f: f.start)
    ]
