"""The cached guest list of each host (table guests), refreshed from a fresh libvirt listing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from controller.decisions.guests import GuestInfo
from controller.store.models import Guest, Host, utcnow


def record_guest_states(
    session: Session,
    host_name: str,
    guests: Iterable[GuestInfo],
    stale: Mapping[str, bool | None] | None = None,
) -> None:
    """Refresh the cached guest list of a host from a fresh libvirt listing (and, where read,
    whether each guest's QEMU process is stale)."""
    host = session.scalars(select(Host).where(Host.name == host_name)).one_or_none()
    if host is None:
        return
    known = {g.uuid: g for g in session.scalars(select(Guest).where(Guest.host_id == host.id))}
    seen = set()
    now = utcnow()
    for info in guests:
        seen.add(info.uuid)
        row = known.get(info.uuid)
        if row is None:
            session.add(
                Guest(
                    host_id=host.id,
                    uuid=info.uuid,
                    name=info.name,
                    last_state="unresponsive" if info.unresponsive else info.state.value,
                    last_seen_at=now,
                    qemu_stale=None if stale is None else stale.get(info.uuid),
                )
            )
        else:
            state = "unresponsive" if info.unresponsive else info.state.value
            row.name, row.last_state, row.last_seen_at = info.name, state, now
            if stale is not None:
                row.qemu_stale = stale.get(info.uuid)
    gone = [uuid for uuid in known if uuid not in seen]
    if gone:
        session.execute(delete(Guest).where(Guest.host_id == host.id, Guest.uuid.in_(gone)))
