"""What a process remembers of the freeze hooks it ran is as large as the work in progress: a run
is forgotten once its event's job ended, never while its job lives or while it runs.

Each finished job used to leave one entry (and its threading.Event) per guest for the life of the
process; the soak measured the controller's RSS growing by about 9 KB a job.
"""

from __future__ import annotations

import threading

from sqlalchemy import select

from controller.cycle.guest_notices import HookRun
from controller.daemon.publisher import NoticePublisher
from controller.store.db import unit_of_work
from controller.store.models import JobHost
from tests.conftest import TEST_URI, make_harness, make_settings, start_test_domains
from tests.integration.engine_helpers import run, submit


def _event_id(h, job_id: int) -> str:
    with unit_of_work(h.session_factory) as s:
        return s.scalars(select(JobHost.event_id).where(JobHost.job_id == job_id)).one()


def test_freeze_runs_are_forgotten_once_their_job_ended(db_url, test_driver):
    start_test_domains(test_driver, ["td-fm1", "td-fm2"])
    h = make_harness(db_url, make_settings([{"name": "h1", "uri": TEST_URI, "sync_clock": False}]))
    publisher = NoticePublisher(h.ctx, is_leader=lambda: True, on_approved=lambda job: None)
    notices = h.ctx.notices
    hv = h.ctx.hypervisors.get(TEST_URI)
    uuid = test_driver.lookupByName("td-fm1").UUIDString()
    try:
        ended = run(h, runbook="noop").job
        assert ended.state == "succeeded", (ended.reason, ended.detail)
        live = submit(h, runbook="noop", notice_seconds=600)  # scheduled: not ended
        ended_event, live_event = _event_id(h, ended.id), _event_id(h, live)

        recorded: list[list[HookRun]] = []
        for event in (ended_event, live_event):
            notices.freeze_once(hv, uuid, "td-fm1", event, recorded.append)
        assert len(recorded) == 2  # each ran (the test driver has no agent: an error recorded)

        # A run of the ended job's event still in progress, on another guest.
        release, entered = threading.Event(), threading.Event()

        def slow_record(runs: list[HookRun]) -> None:
            entered.set()
            release.wait(10)

        running = threading.Thread(
            target=notices.freeze_once, args=(hv, uuid, "td-fm2", ended_event, slow_record)
        )
        running.start()
        try:
            assert entered.wait(10)
            assert notices.events_held() == {ended_event, live_event}
            publisher.forget_ended()
            assert not notices.froze(ended_event, "td-fm1")  # its job ended: forgotten
            assert notices.froze(ended_event, "td-fm2")  # still running: kept
            assert notices.froze(live_event, "td-fm1")  # its job lives: kept
            # A second caller of the live event's hooks still finds them run.
            assert notices.freeze_once(hv, uuid, "td-fm1", live_event, recorded.append) is None
        finally:
            release.set()
            running.join(10)
        publisher.forget_ended()
        assert notices.events_held() == {live_event}
        assert not notices.froze(ended_event, "td-fm2")
    finally:
        publisher.stop()
        h.ctx.close()
