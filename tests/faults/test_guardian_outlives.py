"""The guardian outlives the service (issue 20): a graceful stop while libvirtd is down, and
kill -9, stop and restart of the shipped unit under a real systemd, never leave a guest paused
once libvirtd answers again. The witness (tests/faults/bed.py) sees the guests; maintctl's own
records are only checked after it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import QEMU_URI
from tests.e2e.service import free_port
from tests.faults.bed import (
    Sampler,
    kill_libvirtd,
    libvirtd_restored,
    report,
    start_libvirtd,
    wait_for,
)
from tests.faults.conftest import Bed
from tests.systemdbed import REPO, SystemdMachine

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0
BACK_WITHIN = 5.0


def test_a_graceful_stop_while_libvirtd_is_down_hands_the_guests_to_the_guardian(
    fault_bed: Bed,
) -> None:
    bed = fault_bed
    job_id = bed.submit("nap", BUDGET, seconds="2")
    kill_libvirtd()
    stop_at = time.monotonic()
    bed.service.stop()  # SIGTERM: what systemctl stop, a package upgrade or a shutdown does
    stopped = time.monotonic() - stop_at
    assert bed.service.proc is not None and bed.service.proc.poll() is not None
    time.sleep(1.0)  # the service is gone, libvirtd still down: nobody can resume yet
    assert not any(bed.witness.running(n) for n in bed.names)
    back = time.monotonic()
    start_libvirtd()
    wait_for(bed.witness.all_running, BACK_WITHIN + 5, "every guest running, service down")
    slowest = max(bed.witness.span(n).running for n in bed.names) - back  # type: ignore[type-var]
    assert bed.service.proc.poll() is not None, "the service came back by itself"
    log = bed.service.log.read_text()
    assert "handed to its guardian" in log, log[-3000:]
    report(
        "graceful stop while libvirtd is down, libvirtd back after the service exited",
        service_stop_s=round(stopped, 2),
        slowest_guest_running_after_libvirtd_s=round(slowest, 3),
    )
    assert slowest < BACK_WITHIN
    # The next start reads an honest record: the job's handover, every intent resolved.
    bed.service.start()
    records = bed.finished(job_id, timeout=30)
    assert "guardian_handover" in records.kinds()
    assert records.open_intents == 0
    for name in bed.names:
        assert records.guests[name]["status"] == "resumed"


# --- under a real systemd -------------------------------------------------------------------------

SHIPPED_UNIT = REPO / "deploy" / "maintctl.service"
MAINTCTL = Path(sys.prefix) / "bin" / "maintctl"
CONFIG = """
[server]
bind = "127.0.0.1:{port}"
auth = false
[database]
url = "sqlite:////var/lib/maintctl/maintctl.db"
[maintenance]
guardian = true
reconcile_interval_seconds = 1.0
notice_seconds = 0
[[hosts]]
name = "local"
uri = "qemu:///system"
[runbooks.nap]
argv = ["sleep", "{{seconds}}"]
timeout_seconds = 4
[runbooks.nap.params]
seconds = '^[0-9]$'
"""
DROPIN = """[Service]
ExecStart=
ExecStart={maintctl} serve --config /etc/maintctl/maintctl.toml
"""


def _guardian_scopes(m: SystemdMachine) -> list[str]:
    listed = m.systemctl(
        "list-units", "--type=scope", "--no-legend", "--plain", "maintctl-guardian-*"
    ).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


@pytest.mark.parametrize("event", ["kill9", "stop", "restart"])
def test_the_guardian_outlives_the_service_under_systemd(
    systemd_machine: SystemdMachine, bed, bed_guests, event: str
) -> None:
    m = systemd_machine
    names = [g.name for g in bed_guests]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    m.write("/etc/maintctl/maintctl.toml", CONFIG.format(port=port), mode=0o640)
    m.write("/etc/systemd/system/maintctl.service", SHIPPED_UNIT.read_text())
    m.install_unit("maintctl.service.d/test.conf", DROPIN.format(maintctl=MAINTCTL))
    m.run(["rm", "-f", "/var/lib/maintctl/maintctl.db"], check=False)
    m.systemctl("start", "maintctl.service")
    try:
        with libvirtd_restored(), Sampler(QEMU_URI, names) as witness:

            def ready() -> bool:
                try:
                    return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, 60, "the service under systemd", interval=0.2)
            r = httpx.post(
                f"{url}/api/v1/jobs",
                json={
                    "hosts": ["local"],
                    "runbook": "nap",
                    "params": {"seconds": "2"},
                    "pause_budget_seconds": BUDGET,
                },
                timeout=10,
            )
            assert r.status_code == 201, r.text
            wait_for(witness.all_paused, 20, "every guest paused")
            (scope,) = _guardian_scopes(m)
            (guardian,) = m.unit_pids(scope)  # a scope has no main pid: its cgroup's one process
            main = m.unit_main_pid("maintctl.service")
            assert guardian not in m.unit_pids("maintctl.service")
            kill_libvirtd()
            if event == "kill9":
                m.run(["kill", "-9", str(main)])
            else:
                m.systemctl(event, "maintctl.service")
            time.sleep(1.0)
            assert not m.alive(main)
            assert m.alive(guardian), f"the guardian did not survive {event}"
            assert scope in _guardian_scopes(m)
            assert not any(witness.running(n) for n in names)
            back = time.monotonic()
            start_libvirtd()
            wait_for(witness.all_running, BACK_WITHIN + 5, "every guest running again")
            slowest = max(witness.span(n).running for n in names) - back  # type: ignore[type-var]
            report(
                f"systemd: {event} of the service while libvirtd is down",
                slowest_guest_running_after_libvirtd_s=round(slowest, 3),
            )
            assert slowest < BACK_WITHIN
            # The guardian leaves once its guests run (its scope is collected).
            wait_for(lambda: not m.alive(guardian), 20, "the guardian to leave")
    finally:
        m.systemctl("stop", "maintctl.service", check=False)
