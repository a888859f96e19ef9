"""The notice publisher: keeps every guest's Scheduled Events document current, on the leader.

Each pass (every `metadata.publish_interval_seconds`, and at once when poked):
- an item in its notice learns its Resources (the guests its host would pause, from libvirt);
- every guest's document is rebuilt and stored when it changed (a new DocumentIncarnation);
- a changed document is written into its guest through the agent, unless the guest's host runs
  a cycle right now (the engine writes those itself, before its pause; an agent call must never
  queue in front of a resume's clock sync);
- a guest that sees a Scheduled event for the first time runs its freeze hooks; all of them
  exiting 0 approve the event, which may end the notice early;
- every few passes, while the metadata listener is on, every host's guests are listed with the
  addresses libvirt learned for them from outside the guest (who is asking, for the listener).
On every replica, leader or not, every FORGET_SECONDS: the freeze runs this process remembers
(so that a guest's hooks run once per event) are forgotten once their event's job ended.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from controller.cycle.guest_notices import HookRun, agentless, freeze_ran, record_hooks
from controller.cycle.runtime import Runtime
from controller.decisions.guests import GuestInfo
from controller.decisions.preflight import BusyGuestPolicy, classify_guests
from controller.decisions.states import TERMINAL, ItemState
from controller.errors import HypervisorError
from controller.store.db import is_database_outage, unit_of_work
from controller.store.guest_cache import record_guest_states
from controller.store.models import Host, Job, JobHost, utcnow
from controller.work import guest_documents as se

log = logging.getLogger(__name__)

ADDRESS_REFRESH_SECONDS = 10.0
FORGET_SECONDS = 30.0
FORGET_BATCH = 500
ENDED = sorted(s.value for s in TERMINAL)


class NoticePublisher:
    def __init__(
        self,
        ctx: Runtime,
        *,
        is_leader: Callable[[], bool],
        on_approved: Callable[[int], None],
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.metadata
        self.is_leader = is_leader
        self.on_approved = on_approved
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hooks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="guest-hook")
        self._addresses_at = 0.0
        self._forgot_at = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="notice-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._hooks.shutdown(wait=False, cancel_futures=True)

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.publish_interval_seconds)
            self._wake.clear()
            if self._stop.is_set():
                continue
            try:
                if self.is_leader():
                    self.tick()
                if time.monotonic() - self._forgot_at > FORGET_SECONDS:
                    self._forgot_at = time.monotonic()
                    self.forget_ended()
            except Exception as exc:
                if is_database_outage(exc):
                    log.warning("Scheduled Events wait for the database: %s", exc)
                else:
                    log.exception("publishing Scheduled Events failed; trying again")

    # --- one pass ----------------------------------------------------------------------------

    def tick(self) -> None:
        uris = self._host_uris()
        self._fill_resources(uris)
        with unit_of_work(self.ctx.session_factory) as s:
            se.publish(
                s,
                now=utcnow(),
                grace_seconds=self.settings.grace_seconds,
                apply_timeouts=self.ctx.settings.apply_timeouts,
            )
            todo = se.unpushed(s)
        if not self.settings.guest_agent:
            return
        guests = self._guests_by_name(
            uris, {d.host for d in todo if d.host and not agentless(uris.get(d.host, ""))}
        )
        for doc in todo:
            if agentless(uris.get(doc.host or "", "")):
                with unit_of_work(self.ctx.session_factory) as s:
                    se.mark_pushed(s, doc.guest, doc.digest)
                continue
            found = guests.get((doc.host or "", doc.guest))
            error = "the guest is not on its host any more" if found is None else None
            if found is not None:
                error = self.ctx.notices.write(self.ctx.hypervisors.get(found[0]), found[1], doc)
            job_id = _job_of(self.ctx, doc)
            with unit_of_work(self.ctx.session_factory) as s:
                self.ctx.notices.record_write(s, doc, job_id, error)
        self._freeze_in_notice(uris, guests)
        listening = self.settings.bind is not None
        if listening and time.monotonic() - self._addresses_at > ADDRESS_REFRESH_SECONDS:
            self._addresses_at = time.monotonic()
            self._refresh_identities(uris)

    def forget_ended(self) -> None:
        """Forget the freeze runs of events whose jobs ended (or were pruned): on every replica,
        leader or not, since the engine runs freeze hooks wherever it runs a host."""
        held = sorted(self.ctx.notices.events_held())
        live: set[str] = set()
        for at in range(0, len(held), FORGET_BATCH):
            batch = held[at : at + FORGET_BATCH]
            with unit_of_work(self.ctx.session_factory, read_only=True) as s:
                live.update(
                    s.scalars(
                        select(JobHost.event_id)
                        .join(Job, Job.id == JobHost.job_id)
                        .where(JobHost.event_id.in_(batch), Job.state.not_in(ENDED))
                    )
                )
        self.ctx.notices.forget(set(held) - live)

    def _host_uris(self) -> dict[str, str]:
        with unit_of_work(self.ctx.session_factory, read_only=True) as s:
            return {name: uri for name, uri in s.execute(select(Host.name, Host.uri))}

    def _list(self, uri: str) -> list[GuestInfo] | None:
        try:
            return self.ctx.hypervisors.get(uri).list_guests()
        except HypervisorError as exc:
            log.warning("cannot list the guests of %s for their notices: %s", uri, exc)
            return None

    def _fill_resources(self, uris: dict[str, str]) -> None:
        with unit_of_work(self.ctx.session_factory, read_only=True) as s:
            unfilled = se.unfilled_notices(s)
        for item_id, _job, host, exclude, busy in unfilled:
            if host not in uris:
                continue
            listing = self._list(uris[host])
            if listing is None:
                continue
            plan = classify_guests(listing, exclude=exclude, busy=BusyGuestPolicy(busy))
            with unit_of_work(self.ctx.session_factory) as s:
                se.set_resources(s, item_id, sorted(g.name for g in plan.targets))

    def _guests_by_name(
        self, uris: dict[str, str], hosts: set[str]
    ) -> dict[tuple[str, str], tuple[str, str]]:
        """(host, guest name) -> (host URI, guest UUID)."""
        out: dict[tuple[str, str], tuple[str, str]] = {}
        for host in hosts:
            if host not in uris:
                continue
            for g in self._list(uris[host]) or []:
                out[(host, g.name)] = (uris[host], g.uuid)
        return out

    def _freeze_in_notice(
        self, uris: dict[str, str], guests: dict[tuple[str, str], tuple[str, str]]
    ) -> None:
        """A guest that was told of a Scheduled event runs its freeze hooks now, in the notice."""
        with unit_of_work(self.ctx.session_factory, read_only=True) as s:
            items = s.execute(
                select(JobHost.job_id, JobHost.host, JobHost.event_id, JobHost.resources).where(
                    JobHost.state == ItemState.NOTIFYING.value,
                    JobHost.owner.is_(None),
                    JobHost.resources.is_not(None),
                    JobHost.approved_at.is_(None),
                )
            ).all()
        items = [i for i in items if not agentless(uris.get(i[1], "test:"))]
        missing = {h for _, h, _, _ in items} - {h for h, _ in guests}
        guests = {**guests, **self._guests_by_name(uris, missing)}
        for job_id, host, event_id, resources in items:
            for name in resources or []:
                if event_id is None or self.ctx.notices.froze(event_id, name):
                    continue
                found = guests.get((host, name))
                if found is None:
                    continue
                self._hooks.submit(self._freeze, job_id, host, event_id, name, *found)

    def _freeze(
        self, job_id: int, host: str, event_id: str, name: str, uri: str, uuid: str
    ) -> None:
        try:
            approved: list[int] = []

            def record(runs: list[HookRun]) -> None:
                approved.extend(
                    record_hooks(
                        self.ctx.session_factory, runs, job_id=job_id, host=host, approve=True
                    )
                )

            self.ctx.notices.freeze_once(
                self.ctx.hypervisors.get(uri),
                uuid,
                name,
                event_id,
                record,
                lambda: freeze_ran(
                    self.ctx.session_factory, job_id=job_id, guest=name, event_id=event_id
                ),
            )
            for job in set(approved):
                self.on_approved(job)
        except Exception:
            log.exception("freeze hooks of %s failed", name)

    def _refresh_identities(self, uris: dict[str, str]) -> None:
        """Who may ask the metadata listener: every guest of every host (name, UUID, host: the
        instance metadata) with the addresses libvirt learned for it from outside the guest."""
        md = self.settings
        sources = tuple(md.learn_addresses)
        filters = frozenset(md.spoofing_filters) or None
        for host, uri in uris.items():
            listing = self._list(uri)
            if listing is None:
                continue
            with unit_of_work(self.ctx.session_factory) as s:
                record_guest_states(s, host, listing)
            if not sources or agentless(uri):
                continue
            hv = self.ctx.hypervisors.get(uri)
            for guest in listing:
                try:
                    addrs = hv.guest_addresses(guest.uuid, sources=sources, filters=filters)
                except HypervisorError:
                    addrs = []
                with unit_of_work(self.ctx.session_factory) as s:
                    se.set_addresses(s, host, guest.uuid, addrs)


def _job_of(ctx: Runtime, doc: se.Published) -> int | None:
    if not doc.events:
        return None
    with unit_of_work(ctx.session_factory, read_only=True) as s:
        return s.scalar(select(JobHost.job_id).where(JobHost.event_id == doc.events[0]["EventId"]))
