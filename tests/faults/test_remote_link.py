"""The link to a remote host is cut while its guests are paused: the host's own guardian resumes
them by its deadline, with the controller alive but unable to reach the host."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from controller.daemon.scheduler import MaintenanceScheduler
from controller.store.db import unit_of_work
from controller.store.models import PauseIntent
from tests.conftest import make_harness, make_settings
from tests.faults.bed import report, wait_for
from tests.fleet import FleetSampler, WatchedHost
from tests.integration.engine_helpers import read_outcome, submit
from tests.integration.test_fleet_rollout import _remote_host_config
from tests.sshbed import children

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0
RESERVE = 3.0  # the default resume_reserve_seconds: the guardian acts at BUDGET - RESERVE / 2
GUARDIAN_AT = BUDGET - RESERVE / 2


def connection_processes(sshd_pid: int) -> list[int]:
    """Every sshd process serving a connection to the bed's sshd (each connection's "[priv]"
    monitor and its user's "@notty" process): stopping them all cuts every link to the host."""
    found = []
    for monitor in children(sshd_pid):
        found.append(monitor)
        for child in children(monitor):
            with contextlib.suppress(FileNotFoundError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "sshd":
                    found.append(child)
    return found


def test_a_cut_link_while_paused_is_healed_by_the_hosts_guardian(
    ssh_host, ssh_guest, sqlite_url
) -> None:
    settings = make_settings([_remote_host_config(ssh_host, update_domain=0)])
    nap = {"argv": ["sleep", "4"], "timeout_seconds": 5}  # fits in 8 s with the 3 s reserve
    settings.runbooks["nap"] = type(settings.runbooks["noop"]).model_validate(nap)
    h = make_harness(sqlite_url, settings)
    watched = [WatchedHost("remote", ssh_host.root_uri, 0, (ssh_guest.name,))]
    guest = ("remote", ssh_guest.name)
    stopped: list[int] = []
    job_id = submit(h, hosts=["remote"], runbook="nap", pause_budget_seconds=BUDGET)
    runner = threading.Thread(target=MaintenanceScheduler(h.ctx).start_now, args=(job_id,))
    try:
        with FleetSampler(watched) as seen:
            runner.start()
            paused_at = wait_for(lambda: guest in seen.last_paused(), 30, "the remote guest paused")
            time.sleep(0.5)  # the guardian is armed and the runbook started before the cut
            for pid in connection_processes(ssh_host.sshd_pid):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            cut_at = time.monotonic()
            assert stopped, "no connection to cut"
            running_at = wait_for(
                lambda: guest not in seen.last_paused(), BUDGET + 5, "the guardian's resume"
            )
            time.sleep(max(0.0, paused_at + GUARDIAN_AT + 1.0 - time.monotonic()))
            still_cut = all(Path(f"/proc/{p}").exists() for p in stopped)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        runner.join(timeout=90)
        h.ctx.close()
    assert not runner.is_alive(), "the job did not end once the link was back"
    assert still_cut
    paused_s = running_at - paused_at
    # Resumed by the host alone, at its deadline, while the controller could not reach it.
    assert running_at > cut_at
    assert GUARDIAN_AT - 0.3 <= paused_s <= GUARDIAN_AT + 1.0, paused_s
    assert paused_s < BUDGET
    out = read_outcome(h, job_id)
    assert out.job.state in {"succeeded", "succeeded_with_warnings", "failed"}, out.job.state
    (g,) = out.job.guests
    assert g.status == "resumed", (g.status, g.flagged)
    assert g.pause_ms is not None and abs(g.pause_ms / 1000 - paused_s) < 0.5
    with unit_of_work(h.session_factory) as s:
        assert s.query(PauseIntent).filter(PauseIntent.resolved_at.is_(None)).count() == 0
    report(
        "link to a remote host cut while paused",
        guest_paused_s=round(paused_s, 3),
        guardian_deadline_s=GUARDIAN_AT,
        job=f"{out.job.state}/{out.job.reason}",
    )
