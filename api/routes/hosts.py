from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import CtxDep, PrincipalDep, SessionDep, SettingsDep, requires
from api.schemas import GuestPublic, HostCreate, HostDetail, HostPublic
from controller.services import inventory
from controller.services.tokens import Role
from controller.store.models import Host

router = APIRouter(prefix="/api/v1/hosts", tags=["hosts"])


def _public(h: Host) -> HostPublic:
    return HostPublic.model_validate(h)


@router.get("", response_model=list[HostPublic], **requires(Role.VIEWER))
def list_hosts(session: SessionDep) -> list[HostPublic]:
    """All hosts, from the config file and from the API."""
    return [_public(h) for h in inventory.list_hosts(session)]


@router.get("/{name}", response_model=HostDetail, **requires(Role.VIEWER))
def get_host(name: str, session: SessionDep, ctx: CtxDep, who: PrincipalDep) -> HostDetail:
    """One host with its guests, read live from libvirt (libvirt's error text: admins only)."""
    listing = inventory.inspect_host(session, ctx.hypervisors, name=name)
    return HostDetail(
        **_public(listing.host).model_dump(),
        reachable=listing.error is None,
        error=listing.error_for(admin=who.role.allows(Role.ADMIN)),
        guests=[
            GuestPublic.model_validate(g).model_copy(
                update={
                    "qemu_pid": listing.qemu[g.uuid].pid if g.uuid in listing.qemu else None,
                    "qemu_stale": listing.qemu[g.uuid].stale if g.uuid in listing.qemu else None,
                }
            )
            for g in listing.guests
        ],
    )


@router.post("", response_model=HostPublic, status_code=201, **requires(Role.ADMIN))
def add_host(
    body: HostCreate, session: SessionDep, settings: SettingsDep, who: PrincipalDep
) -> HostPublic:
    """Add a host (admin)."""
    fields = body.model_dump(mode="json", exclude={"ssh"})
    ssh = None if body.ssh is None else body.ssh.model_dump(mode="json", exclude_none=True)
    host = inventory.add_host(
        session,
        **fields,
        ssh=ssh,
        guardian=settings.maintenance.guardian,
        allow_test_driver=settings.maintenance.allow_test_driver,
        actor=who.name,
    )
    return _public(host)


@router.delete("/{name}", status_code=204, response_class=Response, **requires(Role.ADMIN))
def delete_host(name: str, session: SessionDep, who: PrincipalDep) -> Response:
    """Remove a host added through the API (admin)."""
    inventory.remove_host(session, name=name, actor=who.name)
    return Response(status_code=204)
