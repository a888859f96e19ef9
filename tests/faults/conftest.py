"""Fixtures of the fault suite: a service on the real bed, its records, and the witness."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import Event, Job, JobGuest, PauseIntent
from tests.conftest import QEMU_URI
from tests.e2e.service import Client, Service, host_block
from tests.faults.bed import FAULT_RUNBOOKS, Sampler, libvirtd_restored, wait_for
from tests.systemdbed import SystemdMachine, ensure_root
from tests.testbed import BedGuest

TERMINAL = {
    "succeeded",
    "succeeded_with_warnings",
    "failed",
    "cancelled",
    "aborted",
    "expired",
    "interrupted",
}


@dataclass
class Records:
    """What maintctl recorded, read from its database directly."""

    job: dict[str, Any]
    guests: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]
    open_intents: int

    def kinds(self, guest: str | None = None) -> list[str]:
        return [e["kind"] for e in self.events if guest is None or e["guest"] == guest]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def read_records(db_url: str, job_id: int) -> Records:
    engine = make_engine(db_url)
    try:
        with unit_of_work(make_session_factory(engine)) as s:
            job = s.get(Job, job_id)
            assert job is not None
            guests = {
                g.guest: {
                    c: getattr(g, c)
                    for c in (
                        "status",
                        "paused_at",
                        "resumed_at",
                        "pause_ms",
                        "flagged",
                        "sync_outcome",
                        "clock_skew_ms",
                    )
                }
                for g in s.scalars(select(JobGuest).where(JobGuest.job_id == job_id))
            }
            events = [
                {
                    "id": e.id,
                    "kind": e.kind,
                    "guest": e.guest,
                    "at": e.at,
                    "details": e.details,
                    "message": e.message,
                }
                for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
            ]
            open_intents = len(
                list(
                    s.scalars(
                        select(PauseIntent).where(
                            PauseIntent.job_id == job_id, PauseIntent.resolved_at.is_(None)
                        )
                    )
                )
            )
            return Records(
                {"state": job.state, "reason": job.reason, "detail": job.detail},
                guests,
                events,
                open_intents,
            )
    finally:
        engine.dispose()


@dataclass
class Bed:
    """One test's service, client, guests and witness."""

    service: Service
    client: Client
    names: list[str]
    witness: Sampler

    def submit(self, runbook: str, budget: float, **params: str) -> int:
        r = self.client.http.post(
            "/api/v1/jobs",
            json={
                "hosts": ["local"],
                "runbook": runbook,
                "params": params,
                "pause_budget_seconds": budget,
            },
        )
        assert r.status_code == 201, r.text
        job_id: int = r.json()["id"]
        wait_for(self.witness.all_paused, 20, "every guest paused")
        return job_id

    def records(self, job_id: int) -> Records:
        return read_records(self.service.db_url, job_id)

    def wait_records(self, job_id: int, predicate, timeout: float, what: str) -> Records:
        box: list[Records] = []

        def check() -> bool:
            box[:] = [self.records(job_id)]
            return bool(predicate(box[0]))

        wait_for(check, timeout, what, interval=0.2)
        return box[0]

    def finished(self, job_id: int, timeout: float = 60) -> Records:
        """Once the job ended and every guest's record is settled (no paused/resume_pending)."""
        return self.wait_records(
            job_id,
            lambda r: (
                r.job["state"] in TERMINAL
                and set(self.names) <= set(r.guests)  # a guest's row may come with its recovery
                and all(
                    g["status"] == "flagged" or (g["status"] == "resumed" and g["sync_outcome"])
                    for g in r.guests.values()
                )
            ),
            timeout,
            "the job's end and every guest's real outcome",
        )


def make_bed(
    tmp_path: Path, guests: list[BedGuest], *, runbooks: str = "", **service_kw: Any
) -> Iterator[Bed]:
    names = [g.name for g in guests]
    service = Service(
        tmp_path, hosts=host_block("local", QEMU_URI), extra=FAULT_RUNBOOKS + runbooks, **service_kw
    ).start()
    try:
        with libvirtd_restored(), Sampler(QEMU_URI, names) as witness:
            client = Client(service, service.token("operator", "faults"))
            yield Bed(service, client, names, witness)
    finally:
        service.stop()


@pytest.fixture
def fault_bed(tmp_path: Path, bed, bed_guests) -> Iterator[Bed]:
    yield from make_bed(tmp_path, bed_guests)


@pytest.fixture(scope="module")
def systemd_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdMachine]:
    """A real systemd, booted in a container (tests/systemdbed.py), powered off after the
    module. Never skipped: where it cannot boot, the test fails with the reason."""
    log_dir = tmp_path_factory.mktemp("systemd-machine")
    try:
        machine = SystemdMachine(ensure_root(), log_dir=log_dir).start()
    except Exception as exc:
        failure = f"the systemd test machine did not boot: {type(exc).__name__}: {exc}"
    else:
        failure = None
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    try:
        yield machine
    finally:
        machine.close()
