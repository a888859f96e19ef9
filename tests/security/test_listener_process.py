"""The guests' listener as `maintctl serve` runs it: a child process of its own, so that a guest
that saturates it cannot reach the operator API (issue 21's third hole: 150 silent connections
under an open-file limit of 160 stopped the API, /healthz and the listener for 54 s)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import httpx
import pytest

from tests.conftest import process_alive, write_test_host
from tests.e2e.service import Service, free_port, host_block
from tests.security.test_guest_listener import closed_within, silent

HEADER_TIMEOUT = 2.0


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        found.add(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def listener_pid(svc: Service) -> int:
    assert svc.proc is not None
    for pid in children(svc.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"listen" in f.read():
                return pid
    raise AssertionError("no listener child")


@pytest.fixture
def served(tmp_path):
    host = write_test_host(tmp_path, "h1", {"web-a": None})
    mport = free_port()
    svc = Service(
        tmp_path,
        hosts=host_block("h1", host, sync_clock=False),
        extra=f"""
[metadata]
bind = "127.0.0.1:{mport}"
header_timeout_seconds = {HEADER_TIMEOUT}
max_connections_per_source = 8
[metadata.source_addresses]
"127.0.0.1" = "web-a"
""",
        nofile=160,
    )
    svc.metadata_port = mport  # type: ignore[attr-defined]
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_the_api_answers_while_guests_saturate_the_listener(served):
    token = served.token("operator", "ci")
    api = httpx.Client(base_url=served.url, timeout=5, headers={"Authorization": f"Bearer {token}"})
    assert listener_pid(served) != served.proc.pid
    sources = [f"127.0.3.{i}" for i in range(1, 31)] * 10  # 300 silent connections, 30 guests
    opened = time.monotonic()
    socks = silent(served.metadata_port, sources)
    try:
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"})
            latencies.append(time.monotonic() - started)
            assert r.status_code == 201, r.text
            started = time.monotonic()
            assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
        assert max(latencies) < 0.2, latencies
        closed_within(socks, timeout=HEADER_TIMEOUT + 3)
        took = time.monotonic() - opened
        assert took < HEADER_TIMEOUT + 1.5, took  # the header deadline, from the first one
    finally:
        for s in socks:
            s.close()
    # The listener still answers, and the service counts what it refused.
    status = httpx.get(
        f"http://127.0.0.1:{served.metadata_port}/metadata/scheduledevents?api-version=2020-07-01",
        headers={"Metadata": "true"},
        timeout=5,
    ).status_code
    assert status == 200

    def refused(reason: str) -> float:
        text = api.get("/metrics").text
        found = re.search(
            rf'^maintctl_metadata_refused_total{{reason="{reason}"}} (\S+)$', text, re.M
        )
        assert found, text
        return float(found.group(1))

    deadline = time.monotonic() + 5
    while refused("timeout") + refused("connections") < len(sources):
        assert time.monotonic() < deadline, (refused("timeout"), refused("connections"))
        time.sleep(0.2)
    assert refused("connections") > 0 and refused("timeout") > 0
    for reason in ("rate", "size", "bad_request"):
        refused(reason)  # every reason is exported, from 0
    log = served.log.read_text()
    assert "out of system resource" not in log and "Traceback" not in log


def test_a_dead_listener_is_started_again_and_stops_with_serve(served):
    first = listener_pid(served)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        try:
            second = listener_pid(served)
            r = httpx.get(
                f"http://127.0.0.1:{served.metadata_port}/metadata/scheduledevents"
                "?api-version=2020-07-01",
                headers={"Metadata": "true"},
                timeout=2,
            )
            if second != first and r.status_code == 200:
                break
        except (AssertionError, httpx.TransportError):
            pass
        assert time.monotonic() < deadline, "the listener was not started again"
        time.sleep(0.2)
    served.stop()
    assert not process_alive(second)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.metadata_port), timeout=1).close()
