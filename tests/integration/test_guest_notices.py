"""Scheduled Events through the guest agent, on real QEMU guests: the document is written into
the guest before its pause, the guest's hooks run freeze before the pause and thaw after the
resume and clock sync, a freeze hook's success approves the event, a dead agent costs a warning.

The test image carries /etc/maintctl/hooks.d/10-clock (tests/guestimage/hook-clock.sh): it
appends "<phase> <EventId> <guest clock>" to /run/maintctl-hooks.log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from controller.cycle.guest_notices import GuestNotices, freeze_ran
from controller.daemon.publisher import NoticePublisher
from controller.daemon.service import Service
from controller.hosts.libvirt_host import LibvirtHost
from controller.store.db import unit_of_work
from controller.store.models import Job, JobHost
from tests.conftest import QEMU_URI, Harness, make_harness, make_settings
from tests.faults.bed import wait_for
from tests.integration.engine_helpers import read_outcome, run, submit
from tests.testbed import TestBed

pytestmark = pytest.mark.qemu

DOCUMENT = "/run/maintctl/scheduledevents.json"
HOOK_LOG = "/run/maintctl-hooks.log"


@pytest.fixture
def harness(bed, bed_guests, sqlite_url) -> Iterator[Harness]:
    for g in bed_guests:
        bed.guest_exec(g.name, "/bin/rm", "-f", HOOK_LOG, DOCUMENT)
    h = make_harness(sqlite_url, make_settings([{"name": "h1", "uri": QEMU_URI}]))
    yield h
    h.ctx.close()


def _read(name: str, bed: TestBed, path: str) -> bytes:
    """Read a file inside the guest through its agent (guest-file-open/read/close)."""
    host = LibvirtHost(QEMU_URI)
    try:
        return host.read_guest_file(bed.domain(name).UUIDString(), path, 5)
    finally:
        host.close()


def _hook_lines(bed: TestBed, name: str) -> list[tuple[str, str, datetime]]:
    lines = []
    for line in _read(name, bed, HOOK_LOG).decode().splitlines():
        phase, event_id, clock = line.split()
        lines.append((phase, event_id, datetime.fromtimestamp(float(clock), UTC)))
    return lines


def _event_id(h: Harness, job_id: int) -> str:
    with unit_of_work(h.session_factory) as s:
        return s.scalars(select(JobHost.event_id).where(JobHost.job_id == job_id)).one()


def test_document_before_the_pause_and_hooks_around_it(bed, bed_guests, harness):
    names = sorted(g.name for g in bed_guests)
    out = run(harness, runbook="sleep", params={"seconds": "1"})
    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    event_id = _event_id(harness, out.job.id)

    pausing = next(e for e in out.events if e.kind == "pausing")
    for name in names:
        # Written before the pause: its event comes before the pause intents' event...
        written = next(
            e for e in out.events if e.kind == "scheduled_events_written" and e.guest == name
        )
        assert written.id < pausing.id
        # ...and the file in the guest, read back through the agent, is that document.
        document = json.loads(_read(name, bed, DOCUMENT))
        assert document["DocumentIncarnation"] == written.details["incarnation"] >= 1
        [event] = document["Events"]
        assert event["EventId"] == event_id
        assert (event["EventType"], event["EventStatus"], event["NotBefore"]) == (
            "Freeze",
            "Started",
            "",
        )
        assert event["Resources"] == names

        # The hook ran freeze before the guest was paused, by the guest's own clock, and thaw
        # after it was resumed and its clock synced.
        guest = out.guests[name]
        assert guest.sync_outcome == "ok"
        synced = next(e for e in out.events if e.kind == "clock_synced" and e.guest == name)
        hooks = _hook_lines(bed, name)
        assert [(p, e) for p, e, _ in hooks] == [("freeze", event_id), ("thaw", event_id)]
        (_, _, froze_at), (_, _, thawed_at) = hooks
        assert guest.paused_at is not None and guest.resumed_at is not None
        assert froze_at < guest.paused_at, (froze_at, guest.paused_at)
        assert thawed_at > guest.resumed_at and thawed_at > synced.at, (thawed_at, synced.at)
        recorded = [
            (e.details["phase"], e.details["exit_code"])
            for e in out.events
            if e.kind == "guest_hook" and e.guest == name
        ]
        assert recorded == [("freeze", 0), ("thaw", 0)]
    # A hook's time is not the pause's: pause_ms is the runbook's 1 s plus the resume.
    assert all(1000 <= out.guests[n].pause_ms < 2000 for n in names)
    # The process remembers the freeze runs until the job ended, then forgets them.
    assert all(harness.ctx.notices.froze(event_id, n) for n in names)
    publisher = NoticePublisher(harness.ctx, is_leader=lambda: True, on_approved=lambda job: None)
    publisher.forget_ended()
    publisher.stop()
    assert not any(harness.ctx.notices.froze(event_id, n) for n in names)
    assert harness.ctx.notices.events_held() == set()


def test_a_freeze_hook_that_succeeds_approves_the_notice(bed, bed_guests, harness):
    """A 10 minute notice ends as soon as every guest's freeze hook exited 0."""
    service = Service(harness.settings, ctx=harness.ctx)
    service.start()  # the scheduler, and the notice publisher on this (the only) replica
    scheduler = service.scheduler
    try:
        started = time.monotonic()
        job_id = submit(harness, runbook="noop", notice_seconds=600)
        scheduler.arm(job_id, None)

        def state() -> str:
            with unit_of_work(harness.session_factory) as s:
                return s.get_one(Job, job_id).state

        # During the notice the guests got a Scheduled document (read back from one of them).
        name = bed_guests[0].name

        def scheduled() -> bool:
            try:
                events = json.loads(_read(name, bed, DOCUMENT))["Events"]
            except Exception:
                return False
            return bool(events) and events[0]["EventStatus"] in ("Scheduled", "Started")

        wait_for(scheduled, 30, "a Scheduled Events document in the guest")
        wait_for(lambda: state() in ("succeeded", "succeeded_with_warnings"), 60, "the job ends")
        took = time.monotonic() - started
    finally:
        service.stop()
    out = read_outcome(harness, job_id)
    assert took < 60  # not the 600 s notice
    approvals = [e for e in out.events if e.kind == "event_approved"]
    assert approvals and approvals[0].actor.startswith("hook:")
    running = next(e for e in out.events if e.kind == "job_running")
    assert running.details["approved"] is True
    assert running.at > approvals[0].at
    first_doc = next(
        e for e in out.events if e.kind == "scheduled_events_written" and e.guest == name
    )
    assert first_doc.id < next(e for e in out.events if e.kind == "pausing").id

    # The freeze hooks ran once per guest: in the notice (the publisher), not again before the
    # pause (the engine), nor by another process that reads that they ran (a restarted service
    # or another replica: a new GuestNotices).
    event_id = _event_id(harness, job_id)
    assert [p for p, e, _ in _hook_lines(bed, name) if e == event_id] == ["freeze", "thaw"]
    other_process = GuestNotices(harness.settings.metadata, 2)
    host = LibvirtHost(QEMU_URI)
    try:
        again = other_process.freeze_once(
            host,
            bed.domain(name).UUIDString(),
            name,
            event_id,
            lambda runs: None,
            lambda: freeze_ran(
                harness.session_factory, job_id=job_id, guest=name, event_id=event_id
            ),
        )
    finally:
        host.close()
    assert again is None
    assert [p for p, e, _ in _hook_lines(bed, name) if e == event_id] == ["freeze", "thaw"]


def test_a_guest_without_its_agent_gets_no_file_and_the_job_goes_on(bed, bed_guests, harness):
    names = [g.name for g in bed_guests]
    dead = names[1]
    bed.kill_agent(dead)
    time.sleep(0.5)

    out = run(harness, runbook="noop")

    assert out.job.state == "succeeded_with_warnings"  # its clock could not be synced either
    assert out.guests[dead].status == "resumed"
    missing = [e for e in out.events if e.kind == "scheduled_events_not_written"]
    assert [e.guest for e in missing] == [dead]
    assert missing[0].details["warning"] is True
    assert not [e for e in out.events if e.kind == "scheduled_events_written" and e.guest == dead]
    hook = [e for e in out.events if e.kind == "guest_hook" and e.guest == dead]
    assert hook and hook[0].details["error"]  # recorded, not run
    for n in names:
        if n != dead:
            assert json.loads(_read(n, bed, DOCUMENT))["Events"][0]["EventStatus"] == "Started"
            assert out.guests[n].pause_ms < 1000
