"""When a failed host halts a rollout: max_failed_hosts and continue_on_failure, on test:///."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from controller.decisions.rollout import RolloutPolicy
from controller.services.jobs import JobRequest, plan
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import Job, JobHost
from tests.conftest import TEST_URI, make_harness, start_test_domains
from tests.integration.engine_helpers import run

HOSTS = ["h1", "h2", "h3"]
# Fails on h2 only: a runbook is the administrator's argv; MAINTCTL_HOST is set by maintctl.
FAIL_ON_H2 = ["sh", "-c", 'test "$MAINTCTL_HOST" != h2']


@pytest.fixture
def h(db_url, test_driver):
    start_test_domains(test_driver, ["td-a"])
    settings = Settings(
        hosts=[
            {"name": n, "uri": TEST_URI, "sync_clock": False, "update_domain": d}
            for d, n in enumerate(HOSTS)
        ],
        runbooks={
            "patch": {"argv": FAIL_ON_H2, "timeout_seconds": 5},
            "checked": {"argv": ["true"], "timeout_seconds": 5, "check": ["true"]},
            "unhealthy": {
                "argv": ["true"],
                "timeout_seconds": 5,
                "check": ["sh", "-c", "echo not ready on $MAINTCTL_HOST >&2; exit 3"],
            },
        },
        maintenance={"allow_test_driver": True},
    )
    return make_harness(db_url, settings)


def _items(h, job_id):
    with unit_of_work(h.session_factory) as s:
        return {
            i.host: (i.state, i.outcome)
            for i in s.scalars(select(JobHost).where(JobHost.job_id == job_id))
        }


def test_by_default_the_first_failed_host_halts_the_rollout(h):
    out = run(h, hosts=HOSTS, runbook="patch")
    assert (out.job.state, out.job.reason) == ("failed", "runbook_failed")
    assert "rollout halted: 1 host(s) failed (max_failed_hosts 0), 1 later host(s) skipped" in (
        out.job.detail or ""
    )
    with unit_of_work(h.session_factory) as s:
        job = s.get_one(Job, out.job.id)
        progress = [(i.host, i.wave, i.state) for i in job.items]
        assert job.current_wave is None
    assert progress == [("h1", 0, "done"), ("h2", 1, "failed"), ("h3", 2, "skipped")]
    started = [e.details["wave"] for e in out.events if e.kind == "wave_started"]
    assert started == [0, 1]  # the halt: update domain 2 never started
    items = _items(h, out.job.id)
    assert items["h1"][0] == "done" and items["h2"][0] == "failed"
    assert items["h3"][0] == "skipped" and "runbook_failed" in (items["h3"][1] or "")


def test_tolerated_failures_let_the_rollout_go_on_and_end_with_warnings(h):
    out = run(h, hosts=HOSTS, runbook="patch", rollout=RolloutPolicy(max_failed_hosts=1))
    assert (out.job.state, out.job.reason) == ("succeeded_with_warnings", "hosts_failed")
    assert out.job.detail == "1 host(s) failed: h2 (runbook_failed)"
    assert [s for s, _ in _items(h, out.job.id).values()].count("done") == 2


def test_continue_on_failure_tries_every_host_and_still_fails_the_job(h):
    out = run(h, hosts=HOSTS, runbook="patch", rollout=RolloutPolicy(continue_on_failure=True))
    assert (out.job.state, out.job.reason) == ("failed", "hosts_failed")
    items = _items(h, out.job.id)
    assert (items["h1"][0], items["h2"][0], items["h3"][0]) == ("done", "failed", "done")
    assert out.job.rollout == {
        "max_failed_hosts": 0,
        "continue_on_failure": True,
        "wave_pause_seconds": 0.0,
        "gate_timeout_seconds": 60.0,
        "max_parallel_hosts": None,
        "max_paused_per_availability_set": None,
    }
    waves = [(e.kind, e.details["wave"]) for e in out.events if e.kind.startswith("wave_")]
    assert waves == [(k, w) for w in range(3) for k in ("wave_started", "wave_finished")]
    (second,) = [e for e in out.events if e.kind == "wave_finished" and e.details["wave"] == 1]
    assert second.details["failed"] == ["h2"]


def test_a_wave_pause_separates_update_domains(h):
    out = run(
        h,
        hosts=["h1", "h3"],
        runbook="patch",
        rollout=RolloutPolicy(wave_pause_seconds=1.0),
    )
    assert out.job.state == "succeeded"
    with unit_of_work(h.session_factory) as s:
        first, last = s.get_one(Job, out.job.id).items
        gap = (last.started_at - first.finished_at).total_seconds()
    assert gap >= 1.0, gap


def test_the_health_gate_checks_each_finished_wave_before_the_next(h):
    out = run(h, hosts=["h1", "h2", "h3"], runbook="checked")
    assert out.job.state == "succeeded"
    gates = [
        (e.kind, e.details["wave"], e.details["guests"]) for e in out.events if "gate" in e.kind
    ]
    # Between domains 0-1 and 1-2 (none after the last); each checked the wave's one guest, td-a.
    assert gates == [("gate_passed", 0, 1), ("gate_passed", 1, 1)]


def test_a_failed_health_gate_halts_the_rollout_after_its_timeout(h):
    out = run(
        h,
        hosts=["h1", "h2", "h3"],
        runbook="unhealthy",
        rollout=RolloutPolicy(gate_timeout_seconds=1.5),
    )
    assert (out.job.state, out.job.reason) == ("failed", "gate_failed")
    assert "check on h1 exited 3: not ready on h1" in (out.job.detail or "")
    assert "2 later host(s) skipped" in (out.job.detail or "")
    (gate,) = [e for e in out.events if e.kind == "gate_failed"]
    assert 1.5 <= gate.details["waited_s"] < 10
    items = _items(h, out.job.id)
    assert [items[n][0] for n in ("h1", "h2", "h3")] == ["done", "skipped", "skipped"]


def test_the_dry_run_predicts_each_hosts_pause_from_its_own_history(h):
    done = run(h, hosts=["h1", "h3"], runbook="checked")
    assert done.job.state == "succeeded"
    with unit_of_work(h.session_factory) as s:
        paused = {
            g.host: g.pause_ms for g in s.get_one(Job, done.job.id).guests if g.pause_ms is not None
        }
        p = plan(s, h.settings, h.ctx.hypervisors, JobRequest(hosts=HOSTS, runbook="checked"))
    by_host = {name: ms for w in p.waves for name, ms in w.predicted_pause_ms.items()}
    assert by_host == {"h1": paused["h1"], "h2": None, "h3": paused["h3"]}
    assert all(ms > 0 for ms in paused.values())
