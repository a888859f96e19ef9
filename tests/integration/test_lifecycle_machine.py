"""A hypothesis state machine drives the lifecycle against the real database.

Rules: submit, start (notice or claim), claim the next host, renew, pause a guest, resume, finish,
abort, cancel, crash an owner, let time pass (live owners renew meanwhile, one may stall: SIGSTOP,
a partition), reconcile (take over expired leases, resume orphans,
interrupt ownerless jobs). Invariants after every step, read from the database: a host has at
most one held item; an item has at most one live owner and only its current lease renews;
terminal states never change; every guest the model holds paused has exactly one unresolved
intent and no other guest has any; an ended job holds nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import func, select, update

from controller.decisions.states import ACTIVE, ItemState, JobState, is_terminal
from controller.errors import Conflict
from controller.services import jobs as job_service
from controller.store.db import unit_of_work
from controller.store.models import Host, Job, JobHost, PauseIntent, utcnow
from controller.work.items import (
    HELD,
    Lease,
    claim_item,
    create_items,
    finish_item,
    renew,
    take_over,
)
from controller.work.lifecycle import (
    StartKind,
    abort_job,
    cancel_job,
    finish,
    start_job,
    transition,
)
from tests.conftest import migrated

LEASE_SECONDS = 10.0
RENEW_MARGIN = 2.0  # the engine pauses only on a lease renewed this long before it expires
OWNERS = ["replica-a", "replica-b", "replica-c"]
GUESTS_PER_HOST = 2


@dataclass
class Held:
    lease: Lease
    lost: bool = False


def machine_for(factory):
    class LifecycleMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.tag = uuid.uuid4().hex[:8]
            self.hosts = [f"m{self.tag}-{i}" for i in range(2)]
            with unit_of_work(factory) as s:
                for i, name in enumerate(self.hosts):
                    s.add(Host(name=name, uri="test:///default", update_domain=i))
            self.now = utcnow()
            self.jobs: list[int] = []
            self.alive = set(OWNERS)
            self.held: dict[int, Held] = {}  # item id -> the lease its owner believes it holds
            self.issued: list[Lease] = []  # every lease ever handed out
            self.paused: dict[tuple[str, str], int] = {}  # (host, guest) -> job id
            self.ended_jobs: dict[int, str] = {}
            self.ended_items: dict[int, str] = {}

        # --- helpers --------------------------------------------------------------------------

        def _tx(self):
            return unit_of_work(factory)

        def _owner_holds(self, job_id: int) -> Held | None:
            return next((h for h in self.held.values() if h.lease.job_id == job_id), None)

        def _live(self) -> list[Held]:
            return [h for h in self.held.values() if not h.lost and h.lease.owner in self.alive]

        # --- rules ------------------------------------------------------------------------------

        @initialize(
            jobs=st.lists(
                st.tuples(
                    st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
                    st.booleans(),
                ),
                min_size=2,
                max_size=4,
            )
        )
        def some_jobs(self, jobs):
            for hosts, notice in jobs:
                self.submit(hosts, notice)

        @rule(
            hosts=st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
            notice=st.booleans(),
        )
        def submit(self, hosts, notice):
            with self._tx() as s:
                names = [self.hosts[i] for i in hosts]
                job = Job(
                    runbook="noop",
                    host_names=names,
                    pause_budget_seconds=30.0,
                    notice_seconds=5.0 if notice else 0.0,
                )
                s.add(job)
                s.flush()
                rows = {h.name: h for h in s.scalars(select(Host).where(Host.name.in_(names)))}
                create_items(s, job, [rows[n] for n in names])
                self.jobs.append(job.id)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data(), owner=st.sampled_from(OWNERS))
        def start(self, data, owner):
            open_jobs = [j for j in self.jobs if j not in self.ended_jobs] or self.jobs
            job_id = data.draw(st.sampled_from(open_jobs))
            if owner not in self.alive:
                return
            with self._tx() as s:
                job = s.get_one(Job, job_id, with_for_update=True)
                got = start_job(s, job, owner=owner, lease_seconds=LEASE_SECONDS, now=self.now)
            if got.kind is StartKind.CLAIMED and got.lease is not None:
                self.held[got.lease.item_id] = Held(got.lease)
                self.issued.append(got.lease)
            elif got.kind is StartKind.CLAIMED:  # no hosts: the engine ends it at once
                with self._tx() as s:
                    finish(s, job_id, JobState.SUCCEEDED, at=self.now)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def claim_next(self, data):
            """A running job whose owner finished its last item claims its next host."""
            job_id = data.draw(st.sampled_from(self.jobs))
            with self._tx() as s:
                job = s.get_one(Job, job_id)
                if job.state != JobState.RUNNING.value or job.runner_id not in self.alive:
                    return
                if self._owner_holds(job_id) is not None:
                    return
                host = s.scalars(
                    select(JobHost.host)
                    .where(JobHost.job_id == job_id, JobHost.state == ItemState.PENDING.value)
                    .order_by(JobHost.wave, JobHost.position)
                ).first()
                if host is None:
                    return
                lease = claim_item(s, job_id, host, job.runner_id, LEASE_SECONDS, self.now)
            if lease is not None:
                self.held[lease.item_id] = Held(lease)
                self.issued.append(lease)

        @precondition(lambda self: self.held)
        @rule(data=st.data())
        def renew_lease(self, data):
            held = data.draw(st.sampled_from(list(self.held.values())))
            if held.lost or held.lease.owner not in self.alive:
                return
            self._renew(held)

        def _renew(self, held: Held) -> None:
            with self._tx() as s:
                row = s.get_one(JobHost, held.lease.item_id)
                current = row.epoch == held.lease.epoch and row.state in HELD
                renewed, _ = renew(s, held.lease, LEASE_SECONDS, self.now)
            # Only the current lease renews; a lease taken over never renews again.
            assert (renewed is not None) == current
            if renewed is None:
                self._lost(held)
            else:
                held.lease = renewed

        @precondition(lambda self: self.held)
        @rule(data=st.data(), guest=st.integers(0, GUESTS_PER_HOST - 1))
        def pause(self, data, guest):
            """The engine's rule: pause only on a fresh lease, intent first."""
            held = data.draw(st.sampled_from(list(self.held.values())))
            lease = held.lease
            if held.lost or lease.owner not in self.alive:
                return
            if self.now >= lease.expires_at - timedelta(seconds=RENEW_MARGIN):
                return  # not fresh: the engine refuses the pause
            key = (lease.host, f"g{guest}")
            if key in self.paused:
                return
            with self._tx() as s:
                s.add(
                    PauseIntent(
                        job_id=lease.job_id,
                        host=lease.host,
                        host_uri="test:///default",
                        guest=key[1],
                        guest_uuid=f"{lease.host}-{key[1]}",
                    )
                )
            self.paused[key] = lease.job_id

        @precondition(lambda self: self.held)
        @rule(data=st.data(), ok=st.booleans())
        def resume_and_finish(self, data, ok):
            """The owner resumes its guests (fenced if it lost the lease), then ends its item."""
            held = data.draw(st.sampled_from(list(self.held.values())))
            lease = held.lease
            if held.lost or lease.owner not in self.alive:
                return
            with self._tx() as s:
                row = s.get_one(JobHost, lease.item_id)
                fenced = row.epoch != lease.epoch or row.state not in HELD
            if fenced:
                self._lost(held)  # what the fence learns from the renewal
                return
            with self._tx() as s:
                self._resolve(s, lease.job_id, lease.host, "resumed")
                state = ItemState.DONE if ok else ItemState.FAILED
                assert finish_item(
                    s,
                    lease,
                    state,
                    outcome=None if ok else "runbook_failed",
                    detail=None,
                    at=self.now,
                )
                del self.held[lease.item_id]
                job = s.get_one(Job, lease.job_id)
                pending = s.scalar(
                    select(func.count())
                    .select_from(JobHost)
                    .where(JobHost.job_id == job.id, JobHost.state == ItemState.PENDING.value)
                )
                if not ok or job.abort_requested or pending == 0:
                    verdict = (
                        JobState.ABORTED
                        if job.abort_requested
                        else JobState.SUCCEEDED
                        if ok
                        else JobState.FAILED
                    )
                    finish(s, job.id, verdict, at=self.now)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def abort(self, data):
            job_id = data.draw(st.sampled_from(self.jobs))
            with self._tx() as s:
                job = job_service.get_job(s, job_id, lock=True)
                try:
                    job_service.ensure_abortable(job)
                except Conflict:
                    return
                abort_job(s, job, actor="machine", now=self.now)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def cancel(self, data):
            job_id = data.draw(st.sampled_from(self.jobs))
            with self._tx() as s:
                job = job_service.get_job(s, job_id, lock=True)
                try:
                    job_service.ensure_cancellable(job)
                except Conflict:
                    return
                cancel_job(s, job, actor="machine", now=self.now)

        @precondition(lambda self: len(self.alive) > 1)
        @rule(owner=st.sampled_from(OWNERS))
        def crash(self, owner):
            self.alive.discard(owner)

        @rule(data=st.data(), seconds=st.sampled_from([0.5, 2.0, 11.0]))
        def tick(self, data, seconds):
            """Time passes: live owners' keepers renew all along, except a stalled owner's (SIGSTOP,
            a partition), then the periodic reconciliation runs. The stalled owner comes back."""
            holders = sorted({h.lease.owner for h in self._live()})
            stalled = data.draw(st.sampled_from([None, *holders]))
            self.now += timedelta(seconds=seconds)
            for held in list(self._live()):
                if held.lease.owner != stalled:
                    self._renew(held)
            self.reconcile()

        @rule()
        def reconcile(self):
            """Take over expired leases, resume orphaned intents, interrupt ownerless jobs."""
            with self._tx() as s:
                expired = s.execute(
                    select(JobHost.id, JobHost.epoch).where(
                        JobHost.host.in_(self.hosts),
                        JobHost.state.in_(HELD),
                        JobHost.owner.is_not(None),
                        JobHost.lease_expires_at <= self.now,
                    )
                ).all()
            for item_id, epoch in expired:
                with self._tx() as s:
                    assert take_over(s, item_id, epoch, self.now, "lease expired")
                    assert not take_over(s, item_id, epoch, self.now, "again")  # exactly once
            with self._tx() as s:
                for job_id in self.jobs:
                    for host in self.hosts:
                        held = s.scalar(
                            select(func.count())
                            .select_from(JobHost)
                            .where(
                                JobHost.job_id == job_id,
                                JobHost.host == host,
                                JobHost.state.in_(HELD),
                            )
                        )
                        if not held:
                            self._resolve(s, job_id, host, "recovered")
                for job in s.scalars(select(Job).where(Job.id.in_(self.jobs))):
                    held = s.scalar(
                        select(func.count())
                        .select_from(JobHost)
                        .where(JobHost.job_id == job.id, JobHost.state.in_(HELD))
                    )
                    if (
                        job.state in {a.value for a in ACTIVE}
                        and not held
                        and job.runner_id not in self.alive
                    ):
                        transition(
                            s,
                            job,
                            JobState.INTERRUPTED,
                            reason="controller_restarted",
                            at=self.now,
                        )

        def _lost(self, held: Held) -> None:
            """The engine stops at once: no guest call, the job ends failed/lease_lost."""
            held.lost = True
            del self.held[held.lease.item_id]
            with self._tx() as s:
                finish(s, held.lease.job_id, JobState.FAILED, reason="lease_lost", at=self.now)

        def _resolve(self, s, job_id: int, host: str, resolution: str) -> None:
            s.execute(
                update(PauseIntent)
                .where(
                    PauseIntent.job_id == job_id,
                    PauseIntent.host == host,
                    PauseIntent.resolved_at.is_(None),
                )
                .values(resolved_at=self.now, resolution=resolution)
            )
            for key in [k for k, j in self.paused.items() if j == job_id and k[0] == host]:
                del self.paused[key]

        # --- invariants -------------------------------------------------------------------------

        @invariant()
        def one_held_item_per_host(self):
            with self._tx() as s:
                counts = s.execute(
                    select(JobHost.host, func.count())
                    .where(JobHost.host.in_(self.hosts), JobHost.state.in_(HELD))
                    .group_by(JobHost.host)
                ).all()
            assert all(n <= 1 for _, n in counts), counts

        @invariant()
        def at_most_one_live_owner_per_item(self):
            with self._tx() as s:
                rows = {
                    r.id: r for r in s.scalars(select(JobHost).where(JobHost.host.in_(self.hosts)))
                }
            for item_id, row in rows.items():
                valid = [
                    lease
                    for lease in self.issued
                    if lease.item_id == item_id
                    and row.state in HELD
                    and (lease.owner, lease.epoch) == (row.owner, row.epoch)
                ]
                assert len(valid) <= 1, (row.state, valid)
                believers = [
                    h for h in self._live() if h.lease.item_id == item_id and row.state in HELD
                ]
                assert len(believers) <= 1

        @invariant()
        def terminal_states_never_change(self):
            with self._tx() as s:
                for job in s.scalars(select(Job).where(Job.id.in_(self.jobs))):
                    if job.id in self.ended_jobs:
                        assert job.state == self.ended_jobs[job.id], (job.id, job.state)
                    elif is_terminal(job.state):
                        self.ended_jobs[job.id] = job.state
                for item in s.scalars(select(JobHost).where(JobHost.host.in_(self.hosts))):
                    if item.id in self.ended_items:
                        assert item.state == self.ended_items[item.id]
                    elif item.state not in (ItemState.PENDING.value, *HELD):
                        self.ended_items[item.id] = item.state

        @invariant()
        def each_paused_guest_has_exactly_one_open_intent(self):
            with self._tx() as s:
                open_ = s.execute(
                    select(PauseIntent.host, PauseIntent.guest, func.count())
                    .where(PauseIntent.host.in_(self.hosts), PauseIntent.resolved_at.is_(None))
                    .group_by(PauseIntent.host, PauseIntent.guest)
                ).all()
            assert {(h, g): n for h, g, n in open_} == {k: 1 for k in self.paused}

        @invariant()
        def an_ended_job_holds_nothing(self):
            with self._tx() as s:
                rows = s.execute(
                    select(Job.id, Job.state)
                    .join(JobHost, JobHost.job_id == Job.id)
                    .where(Job.id.in_(self.jobs), JobHost.state.in_(HELD))
                ).all()
            assert all(not is_terminal(state) for _, state in rows), rows

    return LifecycleMachine


def test_the_lifecycle_keeps_its_invariants(db_url):
    factory = migrated(db_url)
    machine = machine_for(factory)
    machine.TestCase.settings = settings(
        max_examples=80 if db_url.startswith("sqlite") else 30,
        stateful_step_count=50,
        deadline=None,
        # A failure prints its steps; shrinking them can take minutes, longer than CI waits.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine.TestCase().runTest()
