"""`maintctl watch` follows a job from the SSE stream, and a dropped stream loses nothing."""

from __future__ import annotations

import json
import re
import subprocess
import time

from tests.cli.proxy import DroppingProxy
from tests.e2e.service import MAINTCTL


def test_watch_resumes_with_last_event_id_after_the_stream_drops(maintctl):
    proxy = DroppingProxy(maintctl.service.port)
    try:
        r = maintctl.run(
            "submit", "--host", "a", "--host", "b", "--runbook", "sleep", "--param", "seconds=1",
            "-o", "json",
        )  # fmt: skip
        job_id = json.loads(r.stdout)["id"]
        watched = subprocess.run(
            [str(MAINTCTL), "watch", str(job_id), "-o", "json", "--server", proxy.url],
            capture_output=True, text=True, env=maintctl.env(), timeout=30,
        )  # fmt: skip
    finally:
        proxy.close()
    assert watched.returncode == 0, watched.stderr
    printed = [json.loads(line) for line in watched.stdout.splitlines()]
    recorded = maintctl.api().events(job_id)
    # every event of the job, in order, none twice, though the stream broke in the middle
    assert [e["id"] for e in printed] == [e["id"] for e in recorded]
    assert printed[-1]["kind"] == "job_succeeded"
    # the stream was opened twice, the second time with the last id the first one delivered
    streams = proxy.stream_requests()
    assert len(streams) == 2, streams
    assert "last-event-id" not in streams[0].lower()
    resumed_after = int(re.search(r"(?im)^last-event-id: *(\d+)", streams[1]).group(1))
    assert f"resuming after event {resumed_after}" in watched.stderr
    ids = [e["id"] for e in printed]
    assert resumed_after in ids and ids.index(resumed_after) < len(ids) - 1
    # the first stream started after the history that watch read first, and carried events
    history_end = int(re.search(r"after=(\d+)", streams[0]).group(1))
    assert history_end < resumed_after


def test_watch_prints_a_line_per_event_and_the_outcome(maintctl):
    r = maintctl.run("submit", "--host", "b", "--runbook", "noop", "--wait", "-o", "json")
    job = json.loads(r.stdout)
    started = time.monotonic()
    watched = maintctl.run("watch", str(job["id"]))
    assert watched.returncode == 0 and time.monotonic() - started < 5
    lines = watched.stdout.splitlines()
    assert re.search(rf"#\d+ job_created: job {job['id']}: noop on b$", lines[0])
    assert any(
        re.search(r" guest_resumed b/test: test resumed after [0-9.]+ ms$", x) for x in lines
    )
    assert f"job {job['id']}: succeeded  runbook noop on b" in watched.stdout
