"""Telling a host's guests, through their agents, around its pause (Scheduled Events).

Before the first pause (outside the budget): the host's event lists the guests it pauses and says
Started, each guest's document is written into it, and its freeze hooks have run (during the
notice, or now). After the guests resumed and their clocks were synced: their thaw hooks. The
notice is advice to the guests: its failure never keeps a host unpatched, but a database outage
before the pause still fails the host (nothing is paused yet).
"""

from __future__ import annotations

import logging

from controller.cycle.guest_notices import freeze_ran
from controller.cycle.recording import HostRecorder
from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.guests import GuestInfo
from controller.hosts.hypervisor import Hypervisor
from controller.store.db import is_database_outage, unit_of_work
from controller.store.models import JobHost, utcnow
from controller.work import guest_documents
from controller.work.items import Lease

log = logging.getLogger(__name__)


def tell_guests(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    hv: Hypervisor,
    targets: list[GuestInfo],
    lease: Lease | None,
    record: HostRecorder,
) -> str | None:
    """Publish the host's Started event and tell its guests; returns the event's id."""
    if lease is None or not targets:
        return None
    try:
        return _publish_and_tell(ctx, spec, host, hv, targets, lease, record)
    except Exception as exc:
        if is_database_outage(exc):
            raise  # nothing is paused: the job fails as database_unavailable
        log.exception("Scheduled Events of %s not published", host.name)
        return None


def _publish_and_tell(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    hv: Hypervisor,
    targets: list[GuestInfo],
    lease: Lease,
    record: HostRecorder,
) -> str | None:
    md = ctx.settings.metadata
    names = {g.name for g in targets}
    with unit_of_work(ctx.session_factory) as s:
        event_id = s.get_one(JobHost, lease.item_id).event_id
        guest_documents.set_resources(s, lease.item_id, sorted(names))
        guest_documents.publish(
            s,
            now=utcnow(),
            grace_seconds=md.grace_seconds,
            apply_timeouts=ctx.settings.apply_timeouts,
            only=names,
        )
        # Changed now, or earlier by the publisher (which leaves a running host's guests to the
        # cycle): every document of these guests not written into them yet.
        changed = {d.guest: d for d in guest_documents.unpushed_of(s, names)}
    notices = ctx.notices
    if event_id is None or not notices.reaches(host.uri):
        return event_id

    def tell(guest: GuestInfo) -> None:
        doc = changed.get(guest.name)
        if doc is not None:
            error = notices.write(hv, guest.uuid, doc)
            record.document(notices, doc, error)
            if error is not None:
                return  # its agent does not answer: no hook either, no second wait for it
        notices.freeze_once(
            hv,
            guest.uuid,
            guest.name,
            event_id,
            record.hooks,
            lambda: freeze_ran(
                ctx.session_factory, job_id=spec.id, guest=guest.name, event_id=event_id
            ),
        )

    ctx.fan_out(tell, targets)
    return event_id


def thaw_guests(
    ctx: Runtime,
    host: HostRef,
    hv: Hypervisor,
    event_id: str | None,
    back: list[tuple[str, str]],
    record: HostRecorder,
) -> None:
    """After the guests resumed and their clocks were synced: the thaw hooks of those back
    (uuid, name)."""
    if event_id is None or not back or not ctx.notices.reaches(host.uri):
        return

    def thaw(guest: tuple[str, str]) -> None:
        uuid, name = guest
        record.hooks(ctx.notices.run_hooks(hv, uuid, name, "thaw", event_id))

    ctx.fan_out(thaw, back)
