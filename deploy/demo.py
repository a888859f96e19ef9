"""`make demo`: three real QEMU guests, the service on 127.0.0.1:8080, one job through the API.

Leaves the service and the guests running so you can look around; `make demo-stop` ends both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".demo"
CONFIG = STATE / "maintctl.toml"
PIDFILE = STATE / "serve.pid"
MAINTCTL = REPO / ".venv" / "bin" / "maintctl"
URL = "http://127.0.0.1:8080"
GUESTS = ["mtbed-demo-1", "mtbed-demo-2", "mtbed-demo-3"]

CONFIG_TEXT = """\
# Written by `make demo`. See deploy/maintctl.toml.example for every setting.
[server]
bind = "127.0.0.1:8080"

[database]
url = "sqlite:///{db}"
journal_path = "{journal}"

[[hosts]]
name = "local"
uri = "qemu:///system"
update_domain = 0

[runbooks.sleep]
description = "Stands in for a host patch: sleeps while the guests are paused"
argv = ["sleep", "{{seconds}}"]
timeout_seconds = 20

[runbooks.sleep.params]
seconds = "^[0-9]{{1,2}}$"
"""


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def stop_previous() -> None:
    if PIDFILE.exists():
        pid = int(PIDFILE.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
        PIDFILE.unlink()


def start_service() -> None:
    log = open(STATE / "serve.log", "ab")  # noqa: SIM115 - handed to the service for its lifetime
    proc = subprocess.Popen(
        [str(MAINTCTL), "serve", "--config", str(CONFIG)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    PIDFILE.write_text(str(proc.pid))
    for _ in range(300):
        try:
            if httpx.get(f"{URL}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"demo: the service exited; see {STATE / 'serve.log'}")
        time.sleep(0.1)
    sys.exit(f"demo: the service did not answer on {URL}; see {STATE / 'serve.log'}")


def main() -> int:
    from tests.testbed import TestBed  # the same bed the tests use

    STATE.mkdir(exist_ok=True)
    CONFIG.write_text(
        CONFIG_TEXT.format(db=STATE / "maintctl.db", journal=STATE / "maintctl.journal")
    )
    stop_previous()

    say(f"booting {len(GUESTS)} QEMU guests with the guest agent (TCG, ~10 s) ...")
    bed = TestBed()
    bed.boot(GUESTS)

    say(f"starting maintctl serve on {URL} (SQLite: {STATE / 'maintctl.db'}) ...")
    start_service()
    token = (
        subprocess.run(
            [
                str(MAINTCTL),
                "token",
                "create",
                "--role",
                "operator",
                "--name",
                "demo",
                "--config",
                str(CONFIG),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    api = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    say("submitting a maintenance job through the REST API: runbook sleep, seconds=2 ...")
    r = api.post(
        "/api/v1/jobs",
        json={"hosts": ["local"], "runbook": "sleep", "params": {"seconds": "2"}},
        headers={"Idempotency-Key": f"demo-{time.time_ns()}"},
    )
    r.raise_for_status()
    job_id = r.json()["id"]
    while (job := api.get(f"/api/v1/jobs/{job_id}").json())["state"] in {
        "scheduled",
        "notifying",
        "running",
    }:
        time.sleep(0.2)

    print()
    print(f"job {job_id}: {job['state']}" + (f" ({job['reason']})" if job["reason"] else ""))
    print(f"{'guest':<16} {'pause ms':>10} {'clock skew ms':>14}  sync")
    for g in job["guests"]:
        if g["skipped_reason"]:
            print(f"{g['guest']:<16} {'-':>10} {'-':>14}  skipped: {g['skipped_reason']}")
            continue
        skew = "-" if g["clock_skew_ms"] is None else f"{g['clock_skew_ms']:+.3f}"
        print(
            f"{g['guest']:<16} {g['pause_ms']:>10.1f} {skew:>14}  {g['sync_method']}/{g['sync_outcome']}"
        )
    print()
    print(f"dashboard (API docs until the dashboard lands): {URL}/docs")
    print(f"this job:       curl -H 'Authorization: Bearer {token}' {URL}/api/v1/jobs/{job_id}")
    print(f"live events:    curl -N -H 'Authorization: Bearer {token}' {URL}/api/v1/events/stream")
    print("stop the demo:  make demo-stop")
    return 0 if job["state"] == "succeeded" else 1


def stop() -> int:
    from tests.testbed import TestBed

    stop_previous()
    bed = TestBed()
    for name in GUESTS:
        bed.destroy(name)
    say("service stopped, demo guests destroyed")
    return 0


if __name__ == "__main__":
    sys.exit(stop() if sys.argv[1:] == ["stop"] else main())
