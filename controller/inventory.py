"""The database's view of hosts and guests. Hosts come from the config file or the admin API."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from controller.events import record_event
from controller.hypervisor import GuestInfo
from controller.models import Guest, Host, utcnow
from controller.settings import Settings


def sync_config_hosts(session: Session, settings: Settings) -> None:
    """Make the config file's hosts the current ones; hosts added through the API stay."""
    declared = {h.name: h for h in settings.hosts}
    existing = {h.name: h for h in session.scalars(select(Host))}
    for name, cfg in declared.items():
        row = existing.get(name)
        if row is None:
            session.add(
                Host(
                    name=name,
                    uri=cfg.uri,
                    update_domain=cfg.update_domain,
                    patch_via=cfg.patch_via,
                    sync_clock=cfg.sync_clock,
                    source="config",
                )
            )
            record_event(session, "host_added", f"host {name} from the config file", host=name)
        elif (row.uri, row.update_domain, row.patch_via, row.sync_clock, row.source) != (
            cfg.uri,
            cfg.update_domain,
            cfg.patch_via,
            cfg.sync_clock,
            "config",
        ):
            row.uri, row.update_domain, row.patch_via = cfg.uri, cfg.update_domain, cfg.patch_via
            row.sync_clock, row.source = cfg.sync_clock, "config"
            record_event(session, "host_updated", f"host {name} from the config file", host=name)
    for name, row in existing.items():
        if row.source == "config" and name not in declared:
            session.delete(row)
            record_event(session, "host_removed", f"host {name} left the config file", host=name)


def record_guest_states(session: Session, host_name: str, guests: Iterable[GuestInfo]) -> None:
    """Refresh the cached guest list of a host from a fresh libvirt listing."""
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
                    last_state=info.state.value,
                    last_seen_at=now,
                )
            )
        else:
            row.name, row.last_state, row.last_seen_at = info.name, info.state.value, now
    gone = [uuid for uuid in known if uuid not in seen]
    if gone:
        session.execute(delete(Guest).where(Guest.host_id == host.id, Guest.uuid.in_(gone)))
