from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep, requires
from api.schemas import FreezePublic, WindowPublic
from controller.services import windows as window_service
from controller.services.tokens import Role
from controller.store.models import utcnow

router = APIRouter(prefix="/api/v1", tags=["windows"])


@router.get("/windows", response_model=list[WindowPublic], **requires(Role.VIEWER))
def list_windows(settings: SettingsDep) -> list[WindowPublic]:
    """Maintenance windows from the config file, each with its next three openings."""
    return [
        WindowPublic(
            name=v.config.name,
            cron=v.config.cron,
            timezone=v.config.timezone,
            duration_minutes=v.config.duration_minutes,
            hosts=v.config.hosts,
            selector=v.config.selector,
            job=None if v.config.job is None else v.config.job.model_dump(),
            next_openings=[o.start.isoformat() for o in v.next_openings],
        )
        for v in window_service.list_windows(settings, now=utcnow())
    ]


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
