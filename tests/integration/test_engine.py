"""The maintenance cycle, run against libvirt's test driver AND the real QEMU test bed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt
import pytest

from controller.errors import AdmissionRefused
from controller.hosts.hypervisor import METADATA_KEY, METADATA_NAMESPACE
from tests.conftest import (
    QEMU_URI,
    TEST_URI,
    Harness,
    make_harness,
    make_settings,
    start_test_domains,
)
from tests.integration.engine_helpers import HostUnderTest, run, submit, virsh

OPTOUT_XML = "<maintenance optout='yes'/>"


def _optout(conn: libvirt.virConnect, name: str, on: bool) -> None:
    dom = conn.lookupByName(name)
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        OPTOUT_XML if on else None,
        METADATA_KEY if on else None,
        METADATA_NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )


def _state(conn: libvirt.virConnect, name: str) -> int:
    return conn.lookupByName(name).state()[0]


@pytest.fixture(params=["test", pytest.param("qemu", marks=pytest.mark.qemu)])
def host(request: pytest.FixtureRequest) -> Iterator[HostUnderTest]:
    if request.param == "test":
        conn = request.getfixturevalue("test_driver")
        names = ["td-a", "td-b", "td-c"]
        start_test_domains(conn, names)
        uri, sync = TEST_URI, False

        def pause_by_hand(name: str) -> None:
            conn.lookupByName(name).suspend()  # virsh cannot reach this process's test driver
    else:
        guests = request.getfixturevalue("bed_guests")
        conn = request.getfixturevalue("bed").conn
        names = [g.name for g in guests]
        uri, sync = QEMU_URI, True

        def pause_by_hand(name: str) -> None:
            virsh(QEMU_URI, "suspend", name)

    yield HostUnderTest(
        kind=request.param,
        uri=uri,
        running=names,
        sync_clock=sync,
        pause_by_hand=pause_by_hand,
        is_paused=lambda n: _state(conn, n) == libvirt.VIR_DOMAIN_PAUSED,
        is_running=lambda n: _state(conn, n) == libvirt.VIR_DOMAIN_RUNNING,
        set_optout=lambda n, on: _optout(conn, n, on),
    )
    for name in names:
        if _state(conn, name) == libvirt.VIR_DOMAIN_PAUSED:
            conn.lookupByName(name).resume()
        with contextlib.suppress(libvirt.libvirtError):
            _optout(conn, name, False)


@pytest.fixture
def harness(host: HostUnderTest, sqlite_url: str) -> Iterator[Harness]:
    h = make_harness(sqlite_url, make_settings([host.host_config()]))
    yield h
    h.ctx.close()


def test_a_job_pauses_every_running_guest_and_resumes_it(host, harness):
    out = run(harness, runbook="sleep", params={"seconds": "0.5"})

    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    assert out.job.started_at is not None and out.job.finished_at is not None
    assert sorted(out.guests) == sorted(host.running)
    for name in host.running:
        g = out.guests[name]
        assert host.is_running(name)
        assert g.paused_at is not None and g.resumed_at is not None
        assert g.paused_at < g.resumed_at
        # Paused for the runbook (0.5 s) and never near the 30 s budget.
        assert 500 <= g.pause_ms < 5000, g.pause_ms
        assert abs((g.resumed_at - g.paused_at).total_seconds() * 1000 - g.pause_ms) < 1
        expected = ("ok", "set_time") if host.sync_clock else ("disabled", "none")
        assert (g.sync_outcome, g.sync_method) == expected
        told = host.kind == "qemu"  # its Scheduled Events document and hooks, through the agent
        assert out.kinds(name) == (
            ["scheduled_events_written", "guest_hook"] * told
            + ["guest_paused", "guest_resumed", "clock_synced"]
            + ["guest_hook"] * told
        )
    assert all(i.resolution == "resumed" and i.resolved_at for i in out.intents)
    assert len(out.intents) == len(host.running)

    kinds = out.kinds()
    order = [
        "job_running",
        "preflight_done",
        "pausing",
        "guest_paused",
        "runbook_started",
        "runbook_finished",
        "guest_resumed",
        "clock_synced",
        "job_succeeded",
    ]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds


def test_a_guest_paused_beforehand_stays_paused_and_untouched(host, harness):
    first, held = host.running[0], host.running[-1]
    host.pause_by_hand(held)

    out = run(harness, runbook="noop")

    assert out.job.state == "succeeded"
    assert host.is_paused(held) and host.is_running(first)
    assert out.guests[held].skipped_reason == "not running: paused (user)"
    assert out.guests[held].paused_at is None and out.guests[held].resumed_at is None
    assert out.kinds(held) == ["guest_skipped"]
    assert held not in {i.guest for i in out.intents}


def test_excluded_and_opted_out_guests_are_skipped(host, harness):
    excluded, opted = host.running[0], host.running[1]
    host.set_optout(opted, True)

    out = run(harness, runbook="noop", exclude_guests=[excluded])

    assert out.guests[excluded].skipped_reason == "excluded by the job"
    assert out.guests[opted].skipped_reason == "opted out in its libvirt metadata"
    assert out.guests[host.running[2]].pause_ms is not None
    assert {i.guest for i in out.intents} == {host.running[2]}


def test_a_failing_runbook_still_resumes_everything(host, harness):
    out = run(harness, runbook="fail")

    assert (out.job.state, out.job.reason) == ("failed", "runbook_failed")
    assert all(host.is_running(n) for n in host.running)
    assert all(out.guests[n].resumed_at is not None for n in host.running)
    finished = next(e for e in out.events if e.kind == "runbook_finished")
    assert finished.details["exit_code"] == 1


def test_runbook_output_is_captured_into_the_event(host, harness):
    out = run(harness, runbook="echo")
    finished = next(e for e in out.events if e.kind == "runbook_finished")
    assert finished.details["stdout"] == "patched\n"
    assert finished.details["stderr"] == "warn\n"


def test_the_watchdog_kills_a_runbook_that_outlives_the_budget(host, sqlite_url):
    settings = make_settings(
        [host.host_config()], resume_reserve_seconds=1.0, kill_grace_seconds=0.3
    )
    h = make_harness(sqlite_url, settings)
    try:
        out = run(h, runbook="hang", pause_budget_seconds=5)
    finally:
        h.ctx.close()

    assert (out.job.state, out.job.reason) == ("failed", "budget_exceeded")
    assert "budget_exceeded" in out.kinds()
    for name in host.running:
        g = out.guests[name]
        assert host.is_running(name)
        # Paused until the watchdog fired (budget 5 s - reserve 1 s), never past the budget.
        assert 3900 <= g.pause_ms < 5000, g.pause_ms


def test_admission_refuses_before_anything_is_paused(host, harness):
    with pytest.raises(AdmissionRefused, match="does not fit in the pause budget of 10 s"):
        submit(harness, runbook="sleep", params={"seconds": "1"}, pause_budget_seconds=10)
    assert all(host.is_running(n) for n in host.running)
