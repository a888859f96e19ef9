from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep, requires
from api.schemas import RunbookPublic
from controller.services.tokens import Role

router = APIRouter(prefix="/api/v1/runbooks", tags=["runbooks"])


@router.get("", response_model=list[RunbookPublic], **requires(Role.VIEWER))
def list_runbooks(settings: SettingsDep) -> list[RunbookPublic]:
    """Runbooks declared by the administrator in the config file (read-only)."""
    return [
        RunbookPublic(
            name=name,
            description=rb.description,
            argv=rb.argv,
            timeout_seconds=rb.timeout_seconds,
            params=rb.params,
        )
        for name, rb in sorted(settings.runbooks.items())
    ]
