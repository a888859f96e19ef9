"""kill -9 of the controller in the middle of a rollout over two real hosts (two update domains)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import QEMU_URI
from tests.e2e.service import Client, Service, host_block
from tests.faults.bed import FAULT_RUNBOOKS, report, wait_for
from tests.faults.conftest import TERMINAL, read_records
from tests.fleet import FleetSampler, WatchedHost

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0


def test_controller_killed_mid_rollout_leaves_no_guest_paused_and_ends_interrupted(
    tmp_path: Path, bed, bed_guests, second_host
) -> None:
    session_uri, _session_bed, session_guests = second_host
    watched = [
        WatchedHost("system", QEMU_URI, 0, tuple(g.name for g in bed_guests)),
        WatchedHost("session", session_uri, 1, tuple(g.name for g in session_guests)),
    ]
    hosts = host_block("system", QEMU_URI, update_domain=0) + host_block(
        "session", session_uri, update_domain=1
    )
    service = Service(tmp_path, hosts=hosts, extra=FAULT_RUNBOOKS).start()
    system = {("system", g) for g in watched[0].guests}
    try:
        with FleetSampler(watched) as seen:
            client = Client(service, service.token("operator", "fleet"))
            r = client.http.post(
                "/api/v1/jobs",
                json={
                    "hosts": ["system", "session"],
                    "runbook": "nap",
                    "params": {"seconds": "3"},
                    "pause_budget_seconds": BUDGET,
                },
            )
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            wait_for(lambda: system <= seen.last_paused(), 30, "domain 0 paused")
            killed = time.monotonic()
            service.kill9()
            # The guardian of the system host sees its controller gone and resumes at once.
            back = wait_for(lambda: not seen.last_paused(), BUDGET, "no guest paused")
            service.start()  # reconciles before it answers
            records = None

            def ended() -> bool:
                nonlocal records
                records = read_records(service.db_url, job_id)
                return records.job["state"] in TERMINAL

            wait_for(ended, 30, "the job's end", interval=0.2)
            job = client.job(job_id)
    finally:
        service.stop()

    assert records is not None
    assert (records.job["state"], records.job["reason"]) == ("interrupted", "controller_restarted")
    items = {i["host"]: i for i in job["items"]}
    assert items["system"]["state"] == "interrupted", items
    assert items["session"]["state"] == "skipped", items
    # Domain 1 was never touched; domain 0's guests were all back soon after the kill.
    assert not {g for h, g in seen.ever_paused() if h == "session"}
    assert not seen.last_paused() and seen.domains_paused_at_once() == 1
    assert back - killed < 3.0
    assert records.open_intents == 0
    report(
        "controller kill -9 mid-rollout (2 hosts)", all_running_after_kill_s=round(back - killed, 3)
    )
