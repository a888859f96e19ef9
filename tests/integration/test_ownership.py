"""The engine under its lease: abort from another process, takeover of a dead owner's item."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import libvirt
from sqlalchemy import select

from controller.cycle.recovery import reconcile
from controller.daemon.scheduler import MaintenanceScheduler
from controller.services.jobs import get_job
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import JobHost
from controller.work.items import request_abort
from tests.conftest import TEST_URI, make_harness, make_settings, start_test_domains
from tests.faults.bed import wait_for
from tests.integration.engine_helpers import read_outcome, submit


def test_an_abort_written_by_another_process_reaches_the_owner_within_a_renewal(
    db_url, test_driver
):
    doms = start_test_domains(test_driver, ["td-o1", "td-o2"])
    h = make_harness(db_url, make_settings([{"name": "h1", "uri": TEST_URI, "sync_clock": False}]))
    job_id = submit(h, runbook="sleep", params={"seconds": "15"}, pause_budget_seconds=30)
    runner = threading.Thread(target=MaintenanceScheduler(h.ctx).start_now, args=(job_id,))
    runner.start()
    try:
        wait_for(lambda: all(d.state()[0] == libvirt.VIR_DOMAIN_PAUSED for d in doms), 10, "paused")
        # Another replica: its own engine and sessions; it cannot signal this process directly.
        other = make_session_factory(make_engine(db_url))
        asked = time.monotonic()
        with unit_of_work(other) as s:
            assert request_abort(s, get_job(s, job_id, lock=True)) == 1
        wait_for(
            lambda: all(d.state()[0] == libvirt.VIR_DOMAIN_RUNNING for d in doms), 10, "resumed"
        )
        delay = time.monotonic() - asked
    finally:
        runner.join(timeout=30)
        h.ctx.close()
    renew = h.settings.maintenance.lease_renew_seconds
    assert delay < renew + 1.0, delay  # one renewal, then the resume
    out = read_outcome(h, job_id)
    assert out.job.state == "aborted"
    with unit_of_work(h.session_factory) as s:
        item = s.scalars(select(JobHost).where(JobHost.job_id == job_id)).one()
        assert (item.state, item.outcome) == ("aborted", "aborted")


def test_a_dead_owners_item_is_taken_over_once_and_its_guests_resumed(db_url, test_driver):
    """The owner died without a trace but its rows: an expired lease is the only evidence."""
    (dom,) = start_test_domains(test_driver, ["td-o3"])
    h = make_harness(db_url, make_settings([{"name": "h1", "uri": TEST_URI, "sync_clock": False}]))
    job_id = submit(h, runbook="noop")
    from controller.decisions.states import JobState
    from controller.store.models import PauseIntent, utcnow
    from controller.work.items import claim_item
    from controller.work.lifecycle import transition

    with unit_of_work(h.session_factory) as s:
        job = get_job(s, job_id, lock=True)
        lease = claim_item(s, job_id, "h1", "elsewhere:1:1", 2.0, utcnow())
        transition(s, job, JobState.RUNNING)
        job.runner_id = "elsewhere:1:1"  # another machine: only its leases count
        job.lease_expires_at = utcnow() + timedelta(seconds=2)
        s.add(
            PauseIntent(
                job_id=job_id,
                host="h1",
                host_uri=TEST_URI,
                guest="td-o3",
                guest_uuid=dom.UUIDString(),
            )
        )
    assert lease is not None
    dom.suspend()
    assert reconcile(ctx=h.ctx) == []  # lease still valid: not ours to touch
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    time.sleep(2.2)
    tasks = reconcile(ctx=h.ctx)
    assert len(tasks) == 1 and tasks[0].finished.wait(10)
    assert reconcile(ctx=h.ctx) == []  # exactly once
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    h.ctx.outbox.drain(10)
    out = read_outcome(h, job_id)
    assert out.kinds().count("item_taken_over") == 1
    assert out.kinds().count("guest_recovered") == 1
    h.ctx.close()
