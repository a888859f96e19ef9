"""Two real `maintctl serve` replicas on the real PostgreSQL and the real QEMU guests.

Replica A starts first and leads; B follows. Both serve the API and execute the work they claim.
Faults are undone in a `finally` (SIGCONT a stopped replica, stop both services, kill a runbook
left behind). Figures go to $MAINTCTL_FAULT_REPORT for docs/guest-safety.md.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libvirt
import pytest
from sqlalchemy import select

from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import Event, Job, JobHost
from tests.conftest import QEMU_URI
from tests.e2e.service import Client, Service, host_block
from tests.faults.bed import Sampler, report, wait_for
from tests.faults.conftest import TERMINAL, read_records

pytestmark = [pytest.mark.qemu, pytest.mark.postgres, pytest.mark.faults]

LEASE_SECONDS = 4.0
RENEW_SECONDS = 1.0
ENDED = TERMINAL | {"aborted", "succeeded_with_warnings"}
MAINTENANCE = f"lease_seconds = {LEASE_SECONDS}\nlease_renew_seconds = {RENEW_SECONDS}\n"


@dataclass
class Replica:
    service: Service
    client: Client

    @property
    def pid(self) -> int:
        assert self.service.proc is not None
        return self.service.proc.pid

    def health(self) -> dict:
        return self.client.http.get("/healthz", timeout=5).json()  # with its token: every check


@dataclass
class Pair:
    a: Replica
    b: Replica
    db_url: str
    runners: dict[str, Replica]

    def owner(self, job_id: int) -> Replica:
        return self.runners[_job(self.db_url, job_id).runner_id]

    def other(self, replica: Replica) -> Replica:
        return self.b if replica is self.a else self.a


def _job(db_url: str, job_id: int) -> Job:
    engine = make_engine(db_url)
    try:
        with unit_of_work(make_session_factory(engine)) as s:
            return s.get_one(Job, job_id)
    finally:
        engine.dispose()


def _items(db_url: str, job_ids: list[int]) -> list[JobHost]:
    engine = make_engine(db_url)
    try:
        with unit_of_work(make_session_factory(engine)) as s:
            return list(s.scalars(select(JobHost).where(JobHost.job_id.in_(job_ids))))
    finally:
        engine.dispose()


def _start_pair(tmp_path: Path, pg_url: str, hosts: str) -> Pair:
    services = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        services.append(
            Service(
                tmp_path / name,
                hosts=hosts,
                db_url=pg_url,
                guardian=False,  # the lease path alone brings the guests back
                maintenance=MAINTENANCE,
            )
        )
    a_service, b_service = services
    a_service.start()  # first: it migrates and leads
    b_service.start()
    token = a_service.token("operator", "replicas")
    a = Replica(a_service, Client(a_service, token))
    b = Replica(b_service, Client(b_service, token))
    pair = Pair(a, b, pg_url, {})
    pair.runners = {a.health()["runner"]: a, b.health()["runner"]: b}
    assert a.health()["leader"] and not b.health()["leader"]
    return pair


@pytest.fixture
def pair(tmp_path, pg_url, bed, bed_guests):
    p = _start_pair(tmp_path, pg_url, host_block("local", QEMU_URI))
    try:
        yield p
    finally:
        for r in (p.a, p.b):
            if r.service.proc is not None and r.service.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGCONT)
            r.service.stop()


def _submit(replica: Replica, **job) -> int:
    job.setdefault("hosts", ["local"])
    r = replica.client.http.post("/api/v1/jobs", json=job)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _runbook_pid(db_url: str, job_id: int) -> int | None:
    for e in read_records(db_url, job_id).of("runbook_started"):
        return int(e["details"]["pid"])
    return None


def _kill_runbook(db_url: str, job_id: int) -> None:
    pid = _runbook_pid(db_url, job_id)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


# --- (1) many jobs, two replicas, two hosts ------------------------------------------------------


def test_fifty_concurrent_jobs_on_two_replicas_each_run_once_without_overlap(
    tmp_path, pg_url, bed, bed_guests, second_host
):
    uri2, _bed2, _guests2 = second_host
    hosts = host_block("local", QEMU_URI) + host_block("second", uri2, update_domain=1)
    p = _start_pair(tmp_path, pg_url, hosts)
    try:
        replicas = [p.a, p.b]
        requests = [(replicas[i % 2], ["local", "second"][(i // 2) % 2]) for i in range(50)]
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            ids = list(pool.map(lambda rq: _submit(rq[0], hosts=[rq[1]], runbook="noop"), requests))
        assert len(set(ids)) == 50

        def all_ended() -> bool:
            return all(_job(pg_url, j).state in ENDED for j in ids)

        wait_for(all_ended, 300, "all 50 jobs ended", interval=1.0)
        took = time.monotonic() - started
    finally:
        p.a.service.stop()
        p.b.service.stop()
    jobs = {j: _job(pg_url, j) for j in ids}
    assert {j.state for j in jobs.values()} == {"succeeded"}, {
        j: (x.state, x.reason, x.detail) for j, x in jobs.items() if x.state != "succeeded"
    }
    ran_on = {x.runner_id for x in jobs.values()}
    # Every job ran on one of the two replicas. Which one is a race the claim decides (the
    # leader's timers usually win it), so the split is reported, not asserted.
    assert ran_on <= set(p.runners), ran_on
    engine = make_engine(pg_url)
    with unit_of_work(make_session_factory(engine)) as s:
        running = s.scalars(
            select(Event.job_id).where(Event.job_id.in_(ids), Event.kind == "job_running")
        ).all()
    engine.dispose()
    assert sorted(running) == sorted(ids)  # each started exactly once
    items = _items(pg_url, ids)
    assert len(items) == 50 and {i.state for i in items} == {"done"}
    overlaps = 0
    for host in ("local", "second"):
        spans = sorted((i.started_at, i.finished_at) for i in items if i.host == host)
        assert len(spans) == sum(1 for _, h in requests if h == host)
        overlaps += sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)
    assert overlaps == 0
    per_replica = {
        name: sum(1 for x in jobs.values() if x.runner_id == runner)
        for runner, name in ((r, "a" if rep is p.a else "b") for r, rep in p.runners.items())
    }
    report(
        "two replicas: 50 concurrent jobs over 2 hosts",
        seconds=round(took, 1),
        ran_on_a=per_replica["a"],
        ran_on_b=per_replica["b"],
        overlaps=overlaps,
    )


# --- (2) kill -9 of the owner while its guests are paused ---------------------------------------


def test_the_other_replica_resumes_the_guests_of_an_owner_killed_mid_pause(pair, bed, bed_guests):
    names = [g.name for g in bed_guests]
    with Sampler(QEMU_URI, names) as witness:
        job_id = _submit(pair.a, runbook="sleep", params={"seconds": "20"})
        try:
            wait_for(witness.all_paused, 20, "every guest paused")
            wait_for(lambda: _runbook_pid(pair.db_url, job_id) is not None, 5, "runbook")
            owner = pair.owner(job_id)
            killed = time.monotonic()
            owner.service.kill9()
            resumed = wait_for(witness.all_running, LEASE_SECONDS + 5, "the other replica resumes")
            survivor = pair.other(owner)
            r = survivor.client.wait(job_id, {"interrupted"}, timeout=15)
            assert r["reason"] == "controller_restarted"
        finally:
            _kill_runbook(pair.db_url, job_id)
    records = read_records(pair.db_url, job_id)
    recovered = sorted(e["guest"] for e in records.of("guest_recovered"))
    assert recovered == sorted(names)  # exactly one each
    assert len(records.of("item_taken_over")) == 1 and records.open_intents == 0
    (item,) = _items(pair.db_url, [job_id])
    assert (item.state, item.outcome) == ("interrupted", "owner_lost")
    for name in names:
        assert len(witness.spans[name]) == 1
    report(
        "two replicas: owner kill -9 mid-pause (guardian off)",
        to_running_after_kill_s=round(resumed - killed, 2),
    )


# --- (3) kill -9 of the leader --------------------------------------------------------------------


def test_the_follower_takes_the_lead_and_starts_a_timed_job_on_time(pair):
    due = datetime.now(UTC) + timedelta(seconds=10)
    job_id = _submit(pair.b, runbook="noop", not_before=due.isoformat())
    time.sleep(1.5)  # the leader's sweep arms its timer
    pair.a.service.kill9()
    wait_for(lambda: pair.b.health()["leader"], 5, "b leads")
    done = pair.b.client.wait(job_id, {"succeeded"}, timeout=30)
    started = datetime.fromisoformat(done["started_at"])
    late = (started - due).total_seconds()
    assert 0 <= late < 3.0, late
    assert _job(pair.db_url, job_id).runner_id == pair.b.health()["runner"]
    report("two replicas: leader kill -9, job 10 s ahead", started_late_s=round(late, 3))


# --- (4) abort asked on the replica that does not run the job -------------------------------------


def test_abort_on_one_replica_resumes_the_guests_of_the_other(pair, bed, bed_guests):
    names = [g.name for g in bed_guests]
    with Sampler(QEMU_URI, names) as witness:
        job_id = _submit(pair.a, runbook="sleep", params={"seconds": "20"})
        try:
            wait_for(witness.all_paused, 20, "every guest paused")
            owner = pair.owner(job_id)
            other = pair.other(owner)
            asked = time.monotonic()
            r = other.client.http.post(f"/api/v1/jobs/{job_id}/abort")
            assert r.status_code == 202, r.text
            resumed = wait_for(witness.all_running, 10, "the owner resumes")
            done = other.client.wait(job_id, {"aborted"}, timeout=15)
        finally:
            _kill_runbook(pair.db_url, job_id)
    delay = resumed - asked
    assert delay < RENEW_SECONDS + 1.0, delay
    assert done["reason"] == "aborted"
    (item,) = _items(pair.db_url, [job_id])
    assert item.state == "aborted" and item.owner == _job(pair.db_url, job_id).runner_id
    report("two replicas: abort on the other replica", to_running_after_abort_s=round(delay, 3))


# --- (5) a partitioned owner: SIGSTOP for longer than its lease -----------------------------------


def test_a_partitioned_owner_never_touches_the_guests_after_a_takeover(pair, bed, bed_guests):
    names = [g.name for g in bed_guests]
    with Sampler(QEMU_URI, names) as witness:
        job_id = _submit(pair.a, runbook="sleep", params={"seconds": "20"}, pause_budget_seconds=30)
        owner = None
        try:
            wait_for(witness.all_paused, 20, "every guest paused")
            owner = pair.owner(job_id)
            stopped = time.monotonic()
            os.kill(owner.pid, signal.SIGSTOP)
            resumed = wait_for(
                witness.all_running, LEASE_SECONDS + 5, "the other replica takes over"
            )
            taken = read_records(pair.db_url, job_id).of("item_taken_over")
            assert len(taken) == 1
            # The job ends while its owner is still stopped: a process that exists but no
            # longer beats owns nothing.
            survivor = pair.other(owner)
            r = survivor.client.wait(job_id, ENDED, timeout=LEASE_SECONDS + 10)
            ended = time.monotonic()
            time.sleep(max(0.0, stopped + 2 * LEASE_SECONDS - time.monotonic()))
            os.kill(owner.pid, signal.SIGCONT)
            time.sleep(2 * RENEW_SECONDS + 1)  # anything the thawed owner would still do
            after_thaw = survivor.client.wait(job_id, ENDED, timeout=5)
        finally:
            if owner is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(owner.pid, signal.SIGCONT)
            _kill_runbook(pair.db_url, job_id)
    takeover = resumed - stopped
    assert LEASE_SECONDS - 0.5 <= takeover <= LEASE_SECONDS + 5, takeover
    assert (r["state"], r["reason"]) == ("interrupted", "owner_lost"), r
    # A terminal state never changes: the thawed owner's own verdict is refused.
    assert (after_thaw["state"], after_thaw["reason"]) == ("interrupted", "owner_lost")
    # libvirt's side: one pause and one resume per guest; after the takeover each guest ran on,
    # resumed by the reconciler (state reason "unpaused"), never paused again by the old owner.
    for name in names:
        assert len(witness.spans[name]) == 1, witness.spans[name]
        state, reason = bed.state(name)
        assert (state, reason) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
    # maintctl's side: every guest recorded once, by the reconciler; nothing from the old owner
    # about any guest after the takeover.
    records = read_records(pair.db_url, job_id)
    assert sorted(e["guest"] for e in records.of("guest_recovered")) == sorted(names)
    takeover_id = records.of("item_taken_over")[0]["id"]
    after = [e for e in records.events if e["id"] > takeover_id and e["guest"] is not None]
    # (The notice publisher writes each guest's Scheduled Events document, once resumed, when
    # its event ends: a document write, not a touch of the guest's state.)
    touched = {e["kind"] for e in after} - {"scheduled_events_written"}
    assert touched <= {"guest_recovered"}, after
    assert not records.of("guest_resumed")
    (item,) = _items(pair.db_url, [job_id])
    assert item.state == "interrupted"
    report(
        "two replicas: owner SIGSTOPped past its lease",
        takeover_after_stop_s=round(takeover, 2),
        job_ended_after_stop_s=round(ended - stopped, 2),
    )
