"""The database's view of hosts and guests. Hosts come from the config file or the admin API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.decisions.guests import GuestInfo, GuestState, QemuProcess
from controller.decisions.host_uris import uri_problem
from controller.decisions.states import ACTIVE, PENDING
from controller.errors import Conflict, HypervisorError, InvalidRequest, NotFound
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.machine import Machine
from controller.settings import HostConfig, Settings
from controller.store.events import record_event
from controller.store.models import Host, Job


def sync_config_hosts(session: Session, settings: Settings) -> None:
    """Make the config file's hosts the current ones; hosts added through the API stay."""
    declared = {h.name: h for h in settings.hosts}
    existing = {h.name: h for h in session.scalars(select(Host))}
    for name, cfg in declared.items():
        row, wanted = existing.get(name), _config_columns(cfg)
        if row is None:
            session.add(Host(name=name, **wanted))
            record_event(session, "host_added", f"host {name} from the config file", host=name)
        elif any(getattr(row, column) != value for column, value in wanted.items()):
            for column, value in wanted.items():
                setattr(row, column, value)
            record_event(session, "host_updated", f"host {name} from the config file", host=name)
    for name, row in existing.items():
        if row.source == "config" and name not in declared:
            session.delete(row)
            record_event(session, "host_removed", f"host {name} left the config file", host=name)


def _config_columns(cfg: HostConfig) -> dict[str, Any]:
    """What a config-file host's row holds."""
    return {
        "uri": cfg.uri,
        "update_domain": cfg.update_domain,
        "patch_via": cfg.patch_via,
        "ssh": cfg.resolved_ssh(),
        "sync_clock": cfg.sync_clock,
        "labels": dict(cfg.labels),
        "source": "config",
    }


def list_hosts(session: Session) -> list[Host]:
    """Every host, in maintenance order (update domain, then name)."""
    return list(session.scalars(select(Host).order_by(Host.update_domain, Host.name)))


def get_host(session: Session, name: str) -> Host:
    host = session.scalars(select(Host).where(Host.name == name)).one_or_none()
    if host is None:
        raise NotFound(f"host {name!r} does not exist")
    return host


@dataclass(frozen=True)
class HostListing:
    host: Host
    guests: list[GuestInfo]  # by name; empty when libvirt did not answer
    error: str | None  # why libvirt did not answer, in its words: for admins only
    error_category: str | None = None  # the same as one of HOST_PROBLEM_CATEGORIES
    qemu: dict[str, QemuProcess] = field(default_factory=dict)  # by guest UUID, where read

    def error_for(self, *, admin: bool) -> str | None:
        """libvirt's words can quote a host's files (a test driver's node file, a socket path):
        everyone but an admin reads only the category."""
        return self.error if admin else self.error_category


def inspect_host(session: Session, hypervisors: HypervisorPool, *, name: str) -> HostListing:
    """The host with its guests read live from libvirt. Writes nothing: the guest cache is the
    engine's to refresh (at preflight), so a read never waits on, or fails for, a write."""
    host = get_host(session, name)
    try:
        guests = hypervisors.get(host.uri).list_guests()
    except HypervisorError as exc:
        return HostListing(host, [], str(exc), exc.category)
    running = [
        g.uuid for g in guests if g.state is GuestState.RUNNING or g.state is GuestState.PAUSED
    ]
    try:
        qemu = Machine.of(host.ssh).qemu_processes(running)
    except HypervisorError:
        qemu = {}  # a host reached over SSH that does not answer: staleness not known
    return HostListing(host, sorted(guests, key=lambda g: g.name), None, qemu=qemu)


def add_host(
    session: Session,
    *,
    name: str,
    uri: str,
    update_domain: int,
    patch_via: str,
    sync_clock: bool,
    actor: str,
    labels: dict[str, str] | None = None,
    ssh: dict[str, Any] | None = None,
    guardian: bool = True,
    allow_test_driver: bool = False,
) -> Host:
    """A host managed through the API (source "api"); config-file hosts come from sync_config_hosts.

    The same rules as a config-file host (HostConfig): patch_via "ssh" needs the ssh section, and
    so does a uri reached over SSH while the guardian is on (it must run on the host). Its URIs
    pass the allow-list as the API's (controller/decisions/host_uris.py): stricter than the
    config file's, which alone may name a socket, a netcat or a test driver file."""
    for what, value in (("uri", uri), ("ssh.local_uri", (ssh or {}).get("local_uri"))):
        if not isinstance(value, str):
            continue
        problem = uri_problem(value, origin="api", allow_test_driver=allow_test_driver)
        if problem is not None:
            raise InvalidRequest(f"host {name!r}: {what} {value} {problem}")
    if session.scalars(select(Host).where(Host.name == name)).one_or_none() is not None:
        raise Conflict(f"host {name!r} already exists")
    try:
        cfg = HostConfig(
            name=name,
            uri=uri,
            update_domain=update_domain,
            patch_via=patch_via,  # type: ignore[arg-type]
            sync_clock=sync_clock,
            labels=labels or {},
            ssh=ssh,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise InvalidRequest(f"host {name!r}: {problems}") from None
    if guardian and cfg.over_ssh and cfg.ssh is None:
        raise InvalidRequest(
            f"host {name!r}: uri {uri} is reached over SSH, so its guardian must run on the "
            "host: give it an ssh section (user, key_file, known_hosts, ...)"
        )
    host = Host(
        name=name,
        uri=uri,
        update_domain=update_domain,
        patch_via=patch_via,
        ssh=cfg.resolved_ssh(),
        sync_clock=sync_clock,
        labels=dict(labels or {}),
        source="api",
    )
    session.add(host)
    record_event(
        session,
        "host_added",
        f"host {name} ({uri})",
        host=name,
        actor=actor,
        uri=uri,
        update_domain=update_domain,
    )
    session.flush()
    return host


def remove_host(session: Session, *, name: str, actor: str) -> None:
    """Only hosts added through the API, and only while no open job names them."""
    host = get_host(session, name)
    if host.source == "config":
        raise Conflict(f"host {name!r} is declared in the config file: remove it there")
    open_states = [s.value for s in ACTIVE | PENDING]
    for job in session.scalars(select(Job).where(Job.state.in_(open_states))):
        if name in job.host_names:
            raise Conflict(f"host {name!r} has job {job.id} in state {job.state}")
    session.delete(host)
    record_event(session, "host_removed", f"host {name}", host=name, actor=actor)
