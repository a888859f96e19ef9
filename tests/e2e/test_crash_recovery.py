"""kill -9 the controller while guests are paused; the guests come back, each recovered once."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import libvirt
import pytest
from sqlalchemy import select

from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import Event, PauseIntent
from tests.conftest import QEMU_URI, process_alive
from tests.e2e.service import Client, Service, host_block

pytestmark = pytest.mark.qemu


def _states(bed, names):
    return {n: bed.state(n)[0] for n in names}


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _paused_job(service, bed, names):
    """Submit a 20 s runbook and return once every guest is paused; returns (client, job, pid)."""
    client = Client(service, service.token("operator", "ci"))
    job = client.http.post(
        "/api/v1/jobs", json={"hosts": ["local"], "runbook": "sleep", "params": {"seconds": "20"}}
    ).json()
    _wait(lambda: set(_states(bed, names).values()) == {libvirt.VIR_DOMAIN_PAUSED}, 15, "pause")
    _wait(
        lambda: any(e["kind"] == "runbook_started" for e in client.events(job["id"])), 5, "runbook"
    )
    pid = next(e for e in client.events(job["id"]) if e["kind"] == "runbook_started")["details"][
        "pid"
    ]
    return client, job, pid


def _recovered_events(db_url, job_id):
    factory = make_session_factory(make_engine(db_url))
    with unit_of_work(factory) as s:
        events = list(
            s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == "guest_recovered"))
        )
        open_intents = list(
            s.scalars(
                select(PauseIntent).where(
                    PauseIntent.job_id == job_id, PauseIntent.resolved_at.is_(None)
                )
            )
        )
        return [e.guest for e in events], open_intents


def test_restart_reconciles_and_resumes_every_guest_exactly_once(tmp_path, bed, bed_guests):
    names = [g.name for g in bed_guests]
    service = Service(tmp_path, hosts=host_block("local", QEMU_URI), guardian=False).start()
    pid = None
    try:
        client, job, pid = _paused_job(service, bed, names)
        service.kill9()
        time.sleep(1.0)
        # Nobody is left to resume them: they stay paused until the controller comes back.
        assert set(_states(bed, names).values()) == {libvirt.VIR_DOMAIN_PAUSED}

        restarted_at = time.monotonic()
        service.start()
        _wait(
            lambda: set(_states(bed, names).values()) == {libvirt.VIR_DOMAIN_RUNNING}, 10, "resume"
        )
        assert time.monotonic() - restarted_at < 10
        client = Client(service, service.token("viewer", "check"))
        done = client.wait(job["id"], {"interrupted"}, timeout=10)
        assert done["reason"] == "controller_restarted"
        recovered, open_intents = _recovered_events(service.db_url, job["id"])
        assert sorted(recovered) == sorted(names)  # exactly one each
        assert open_intents == []
        for g in done["guests"]:
            assert g["resumed_at"] is not None and g["sync_outcome"] == "ok"
            assert abs(g["clock_skew_ms"]) < 50
        # Later reconciliation passes find nothing more to do.
        time.sleep(2.5)
        assert sorted(_recovered_events(service.db_url, job["id"])[0]) == sorted(names)
        assert bed.counter(names[0]) >= 1  # same boot: RAM survived the crash too
    finally:
        service.stop()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_the_guardian_resumes_guests_when_the_controller_dies(tmp_path, bed, bed_guests):
    names = [g.name for g in bed_guests]
    service = Service(tmp_path, hosts=host_block("local", QEMU_URI), guardian=True).start()
    try:
        client, job, pid = _paused_job(service, bed, names)
        killed_at = time.monotonic()
        service.kill9()
        # No restart: the guardian alone resumes every guest and kills the runbook.
        _wait(
            lambda: set(_states(bed, names).values()) == {libvirt.VIR_DOMAIN_RUNNING}, 5, "guardian"
        )
        assert time.monotonic() - killed_at < 5
        _wait(lambda: not process_alive(pid), 5, "runbook killed")

        service.start()
        client = Client(service, service.token("viewer", "check"))
        done = client.wait(job["id"], {"interrupted"}, timeout=10)
        recovered, open_intents = _recovered_events(service.db_url, job["id"])
        assert sorted(recovered) == sorted(names) and open_intents == []
        assert all(g["sync_outcome"] == "ok" for g in done["guests"])
    finally:
        service.stop()
