"""The real `maintctl serve`: a window opening a few seconds ahead starts the job that waits for
it, and submits its own job, at the opening and not before (libvirt's test driver as the host)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

from tests.conftest import TEST_URI
from tests.e2e.service import MAINTCTL, Client, Service, host_block

LEAD_SECONDS = 8


def _window(opening: datetime) -> str:
    # Six fields, seconds first: an opening to the second, today at this time (UTC).
    cron = f"{opening.second} {opening.minute} {opening.hour} * * *"
    return f"""
[[windows]]
name = "soon"
cron = "{cron}"
timezone = "UTC"
duration_minutes = 1
hosts = ["t1"]
[windows.job]
runbook = "noop"
"""


def test_a_window_opening_seconds_ahead_starts_its_jobs_at_the_opening(tmp_path):
    opening = (datetime.now(UTC) + timedelta(seconds=LEAD_SECONDS)).replace(microsecond=0)
    service = Service(
        tmp_path, hosts=host_block("t1", TEST_URI, sync_clock=False), extra=_window(opening)
    )
    service.start()
    try:
        client = Client(service, service.token("operator", "ci"))
        windows = client.http.get("/api/v1/windows").json()
        assert windows[0]["name"] == "soon"
        assert windows[0]["next_openings"][0] == opening.isoformat()
        assert windows[0]["next_openings"][1] == (opening + timedelta(days=1)).isoformat()
        # The same through the CLI client, as an operator reads it.
        token = service.token("viewer", "eyes")
        listed = subprocess.run(
            [str(MAINTCTL), "windows", "--server", service.url, "--token", token, "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)[0]["next_openings"] == windows[0]["next_openings"]

        r = client.http.post(
            "/api/v1/jobs", json={"hosts": ["t1"], "runbook": "noop", "window": "soon"}
        )
        assert r.status_code == 201, r.text
        mine = r.json()["id"]
        assert datetime.now(UTC) < opening, "the service took too long to start for this test"
        assert client.job(mine)["state"] == "scheduled"

        job = client.wait(mine, {"succeeded"}, timeout=LEAD_SECONDS + 20)
        started = datetime.fromisoformat(job["started_at"])
        assert opening <= started < opening + timedelta(seconds=3), (started, opening)
        kinds = [e["kind"] for e in client.events(mine)]
        assert kinds.index("window_waiting") < kinds.index("job_running")

        jobs = client.http.get("/api/v1/jobs").json()
        by_window = [j for j in jobs if j["created_by"] == "window:soon"]
        assert len(by_window) == 1, jobs
        theirs = client.wait(by_window[0]["id"], {"succeeded"}, timeout=20)
        assert theirs["window"] == "soon"
        assert datetime.fromisoformat(theirs["created_at"]) >= opening
        assert datetime.fromisoformat(theirs["started_at"]) < opening + timedelta(seconds=5)
    finally:
        service.stop()
