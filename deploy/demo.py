"""`make demo`: three real QEMU guests, the service on 127.0.0.1:8080, one job through the API.

Leaves the service and the guests running so you can look around; `make demo-stop` ends both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cli.client import MaintctlClient, Unreachable

if TYPE_CHECKING:
    from tests.testbed import TestBed

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

# Scheduled Events: the guests' metadata listener (in production on 169.254.169.254:80 on
# the guests' bridge). This host's loopback address stands for the first demo guest.
[metadata]
bind = "127.0.0.1:8081"
grace_seconds = 5

[metadata.source_addresses]
"127.0.0.1" = "mtbed-demo-1"

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
    with MaintctlClient(URL, None) as client:
        try:
            client.wait_ready(timeout=30, alive=lambda: proc.poll() is None, healthy=True)
        except Unreachable:
            sys.exit(f"demo: the service did not come up on {URL}; see {STATE / 'serve.log'}")


NOTICE_SECONDS = 60
DOCUMENT = "/run/maintctl/scheduledevents.json"


def show_notice(bed: TestBed, guest: str) -> None:
    """Print the Scheduled Events document as the guest saw it, read inside the guest."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, text = bed.guest_exec(guest, "/bin/cat", DOCUMENT)
        if code == 0 and '"Events": [{' in text:
            say(f"{guest} received its notice; {DOCUMENT} inside the guest reads:")
            print(json.dumps(json.loads(text), indent=2))
            say(
                "its freeze hook (/etc/maintctl/hooks.d/10-clock) exits 0, which approves the "
                f"event: the job starts now instead of after the {NOTICE_SECONDS} s notice"
            )
            return
        time.sleep(0.3)
    say(f"{guest} got no Scheduled Events document within 30 s")


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
    api = MaintctlClient(URL, token)

    say(
        "submitting a maintenance job through the REST API: runbook sleep, seconds=2, with a "
        f"{NOTICE_SECONDS} s notice ..."
    )
    job_id = api.submit(
        {
            "hosts": ["local"],
            "runbook": "sleep",
            "params": {"seconds": "2"},
            "notice_seconds": NOTICE_SECONDS,
        },
        idempotency_key=f"demo-{time.time_ns()}",
    ).job["id"]
    show_notice(bed, GUESTS[0])
    job = api.wait(job_id)
    print()
    say(f"what {GUESTS[0]}'s hook wrote (phase, EventId, the guest's own clock):")
    print(bed.guest_exec(GUESTS[0], "/bin/cat", "/run/maintctl-hooks.log")[1].rstrip())

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
    print(f"dashboard:      {URL}/dashboard  (log in with the token below; API docs: {URL}/docs)")
    print(f"this job:       curl -H 'Authorization: Bearer {token}' {URL}/api/v1/jobs/{job_id}")
    print(f"live events:    curl -N -H 'Authorization: Bearer {token}' {URL}/api/v1/events/stream")
    print(
        "as the guest asks: curl -s -H 'Metadata: true' "
        "'http://127.0.0.1:8081/metadata/scheduledevents?api-version=2020-07-01'"
    )
    print(f"watch this job: MAINTCTL_TOKEN={token} {MAINTCTL} watch {job_id} --server {URL}")
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
