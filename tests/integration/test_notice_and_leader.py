"""The notice is stored, not waited out by a thread; one leader among replicas."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from controller.cycle.runtime import Runtime
from controller.daemon.scheduler import MaintenanceScheduler
from controller.daemon.service import Service
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import Job, JobHost
from controller.work.leader import AdvisoryLockLeader, SecondReplica, SingleReplica
from tests.conftest import TEST_URI, make_harness, make_settings, start_test_domains
from tests.faults.bed import wait_for
from tests.integration.engine_helpers import read_outcome, submit


def _item(h, job_id):
    with unit_of_work(h.session_factory) as s:
        return s.scalars(select(JobHost).where(JobHost.job_id == job_id)).one()


def _state(h, job_id):
    with unit_of_work(h.session_factory) as s:
        return s.get_one(Job, job_id).state


def _harness(db_url):
    return make_harness(
        db_url, make_settings([{"name": "h1", "uri": TEST_URI, "sync_clock": False}])
    )


def test_the_notice_is_a_stored_deadline_that_no_thread_waits_out(db_url, test_driver):
    start_test_domains(test_driver, ["td-n1"])
    h = _harness(db_url)
    svc = Service(h.settings, ctx=h.ctx)
    svc.start()
    sched = svc.scheduler
    try:
        job_id = submit(h, runbook="noop", notice_seconds=2)
        sched.arm(job_id, None)
        wait_for(lambda: _state(h, job_id) == "notifying", 5, "notifying")
        item = _item(h, job_id)
        assert (item.state, item.owner, item.lease_expires_at) == ("notifying", None, None)
        notice = (item.notice_until - item.started_at).total_seconds()
        assert 1.9 <= notice <= 2.1, notice
        # Nothing of this process holds the job: no active entry, no lease thread, no worker.
        assert job_id not in h.ctx.active
        assert not [t for t in threading.enumerate() if t.name == f"lease-{job_id}"]
        wait_for(lambda: _state(h, job_id) == "succeeded", 10, "succeeded")
    finally:
        svc.stop()
    out = read_outcome(h, job_id)
    running = next(e for e in out.events if e.kind == "job_running")
    assert running.details["notice_ended"] is True
    assert running.at >= item.notice_until
    assert (running.at - item.notice_until).total_seconds() < 1.0  # the timer, not a 1 s poll
    assert out.guests["td-n1"].pause_ms is not None


def test_cancel_and_abort_during_the_notice_work_from_another_replica(db_url, test_driver):
    start_test_domains(test_driver, ["td-n2"])
    h = _harness(db_url)
    service_a = Service(h.settings, ctx=h.ctx)
    service_a.start()
    a = service_a.scheduler
    # Replica B: its own engine, sessions and runner id; never started (it only serves the API).
    b_ctx = Runtime(
        settings=h.settings,
        session_factory=make_session_factory(make_engine(db_url)),
        hypervisors=HypervisorPool(LibvirtHost),
        runner_id="replica-b",
    )
    b = MaintenanceScheduler(b_ctx)
    try:
        cancelled = submit(h, runbook="noop", notice_seconds=30)
        a.arm(cancelled, None)
        wait_for(lambda: _state(h, cancelled) == "notifying", 5, "notifying")
        b.cancel(cancelled, actor="ops")
        assert _state(h, cancelled) == "cancelled"
        assert _item(h, cancelled).state == "skipped"

        aborted = submit(h, runbook="noop", notice_seconds=30)  # the host is free again
        a.arm(aborted, None)
        wait_for(lambda: _state(h, aborted) == "notifying", 5, "notifying")
        b.abort(aborted, actor="ops")
        assert _state(h, aborted) == "aborted"
        assert _item(h, aborted).state == "aborted"

        after = submit(h, runbook="noop")
        a.arm(after, None)
        wait_for(lambda: _state(h, after) == "succeeded", 10, "the host was freed")
        time.sleep(1.5)  # A's timers and sweep must not revive what B ended
        assert (_state(h, cancelled), _state(h, aborted)) == ("cancelled", "aborted")
    finally:
        service_a.stop()
        b_ctx.close()
    for job_id in (cancelled, aborted):
        kinds = read_outcome(h, job_id).kinds()
        assert "guest_paused" not in kinds and "job_running" not in kinds, kinds
    assert read_outcome(h, aborted).job.detail == "aborted during the notice"


def test_a_follower_runs_due_work_it_did_not_receive(pg_url, test_driver):
    """Jobs submitted on the leader; the follower's poll claims some; each runs exactly once."""
    start_test_domains(test_driver, ["td-n3"])
    hosts = [{"name": f"h{i}", "uri": TEST_URI, "sync_clock": False} for i in range(1, 5)]
    h = make_harness(pg_url, make_settings(hosts, max_parallel_jobs=1))
    service_a = Service(h.settings, ctx=h.ctx)
    b_ctx = Runtime(
        settings=h.settings,
        session_factory=make_session_factory(make_engine(pg_url)),
        hypervisors=HypervisorPool(LibvirtHost),
        runner_id="replica-b",
    )
    service_b = Service(h.settings, ctx=b_ctx)
    service_a.start()
    service_b.start()
    a = service_a.scheduler
    try:
        assert service_a.is_leader() and not service_b.is_leader()
        ids = [
            submit(h, hosts=[f"h{i}"], runbook="sleep", params={"seconds": "1"})
            for i in range(1, 5)
        ]
        for job_id in ids:
            a.arm(job_id, None)
        wait_for(lambda: all(_state(h, j) == "succeeded" for j in ids), 30, "all succeeded")
    finally:
        service_b.stop()
        service_a.stop()
    with unit_of_work(h.session_factory) as s:
        runners = {j.id: j.runner_id for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        starts = s.scalars(
            select(JobHost.owner).where(JobHost.job_id.in_(ids), JobHost.state == "done")
        ).all()
    assert len(starts) == 4
    assert set(runners.values()) == {h.ctx.runner_id, "replica-b"}, runners
    for job_id in ids:
        assert read_outcome(h, job_id).kinds().count("job_running") == 1


def test_sqlite_refuses_a_second_replica_on_the_same_file(sqlite_url):
    first = SingleReplica(sqlite_url)
    gained: list[str] = []
    first.start(on_gain=lambda: gained.append("first"), on_loss=lambda: None)
    try:
        with pytest.raises(SecondReplica, match="SQLite supports a single replica") as err:
            SingleReplica(sqlite_url).start(
                on_gain=lambda: gained.append("2"), on_loss=lambda: None
            )
        assert "pid" in str(err.value)
    finally:
        first.stop()
    again = SingleReplica(sqlite_url)
    again.start(on_gain=lambda: gained.append("again"), on_loss=lambda: None)
    again.stop()
    assert gained == ["first", "again"]


@pytest.mark.postgres
def test_one_leader_on_postgresql_and_a_new_one_when_it_goes(pg_url):
    log: list[tuple[str, str, float]] = []

    def leader(name):
        return AdvisoryLockLeader(pg_url, check_seconds=0.2), (
            lambda: log.append((name, "gain", time.monotonic())),
            lambda: log.append((name, "loss", time.monotonic())),
        )

    a, (a_gain, a_loss) = leader("a")
    b, (b_gain, b_loss) = leader("b")
    a.start(a_gain, a_loss)
    b.start(b_gain, b_loss)
    try:
        assert a.is_leader and not b.is_leader
        time.sleep(0.6)
        assert not b.is_leader  # it keeps trying, and keeps failing, while a holds the lock
        stopped = time.monotonic()
        a.stop()
        wait_for(lambda: b.is_leader, 2, "b leads once a is gone")
        took = log[-1][2] - stopped
        assert log[-1][:2] == ("b", "gain") and took < 0.5, took
        # b's lock connection is killed (as a PostgreSQL restart or a network cut would do).
        url = make_url(pg_url)
        with psycopg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=url.database,
            autocommit=True,
        ) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
        assert killed == [(True,)]
        wait_for(lambda: ("b", "loss") in [e[:2] for e in log], 2, "b steps down")
        wait_for(lambda: b.is_leader, 2, "b leads again on a new connection")
    finally:
        a.stop()
        b.stop()
    # a stopped on purpose (no loss callback); b lost its lock once and took it again.
    assert [e[:2] for e in log] == [("a", "gain"), ("b", "gain"), ("b", "loss"), ("b", "gain")]
