"""Staged runbooks on libvirt's test driver: prepare before the pause, verify after the resume,
each recorded; a failed verify fails the host; a frozen later host waits out its freeze."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import JobHost
from tests.conftest import TEST_URI, Harness, make_harness, start_test_domains
from tests.integration.engine_helpers import Outcome, run


def _settings(runbook: dict[str, Any], **config: Any) -> Settings:
    return Settings(
        hosts=[
            {"name": "h1", "uri": TEST_URI, "sync_clock": False},
            {"name": "h2", "uri": TEST_URI, "sync_clock": False, "update_domain": 1},
        ],
        runbooks={"staged": runbook},
        maintenance={
            "resume_reserve_seconds": 1.0,
            "kill_grace_seconds": 0.2,
            "allow_test_driver": True,
        },
        **config,
    )


STAGED = {
    "prepare": ["sh", "-c", 'echo "staging for $MAINTCTL_HOST ($MAINTCTL_STEP)"; sleep 0.3'],
    "prepare_timeout_seconds": 10,
    "apply": ["sleep", "0.2"],
    "timeout_seconds": 5,
    "verify": ["sh", "-c", 'echo "checked $MAINTCTL_HOST"'],
    "verify_timeout_seconds": 10,
}


@pytest.fixture
def make(test_driver, sqlite_url) -> Iterator[Any]:
    start_test_domains(test_driver, ["td-a", "td-b"])
    made: list[Harness] = []

    def build(runbook: dict[str, Any], **config: Any) -> Harness:
        h = make_harness(sqlite_url, _settings(runbook, **config))
        made.append(h)
        return h

    yield build
    for h in made:
        h.ctx.close()


def _items(h: Harness, job_id: int) -> dict[str, JobHost]:
    with unit_of_work(h.session_factory) as s:
        return {i.host: i for i in s.scalars(select(JobHost).where(JobHost.job_id == job_id))}


def _one(out: Outcome, kind: str) -> Any:
    found = [e for e in out.events if e.kind == kind]
    assert len(found) == 1, [e.kind for e in out.events]
    return found[0]


def test_prepare_runs_before_the_pause_and_verify_after_every_resume(make):
    h = make(STAGED)
    out = run(h, hosts=["h1"], runbook="staged")

    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    kinds = out.kinds()
    order = ["prepare_started", "prepare_finished", "pausing", "runbook_finished", "verify_started"]
    assert [k for k in kinds if k in order] == order
    last_resume = max(i for i, k in enumerate(kinds) if k == "guest_resumed")
    assert kinds.index("verify_started") > last_resume
    assert kinds.index("verify_finished") > kinds.index("verify_started")
    prepared = _one(out, "prepare_finished").details
    assert (prepared["step"], prepared["exit_code"], prepared["outcome"]) == (
        "prepare",
        0,
        "completed",
    )
    assert prepared["stdout"] == "staging for h1 (prepare)\n"
    assert 0.3 <= prepared["duration_s"] < 2.0
    verified = _one(out, "verify_finished").details
    assert (verified["exit_code"], verified["stdout"]) == (0, "checked h1\n")
    # pause_ms is the apply step's, not prepare's or verify's.
    for g in ("td-a", "td-b"):
        assert 200 <= out.guests[g].pause_ms < 200 + 500, out.guests[g].pause_ms
    paused_at = min(out.guests[g].paused_at for g in ("td-a", "td-b"))
    assert _one(out, "prepare_finished").at <= paused_at


def test_a_failed_verify_fails_the_host_item_and_halts_the_rollout(make):
    runbook = dict(STAGED, verify=["sh", "-c", "echo libvirtd is down >&2; exit 3"])
    h = make(runbook)
    out = run(h, hosts=["h1", "h2"], runbook="staged")

    assert (out.job.state, out.job.reason) == ("failed", "verify_failed")
    assert "exit 3" in out.job.detail and "on h1" in out.job.detail
    items = _items(h, out.job.id)
    assert (items["h1"].state, items["h1"].outcome) == ("failed", "verify_failed")
    assert items["h2"].state == "skipped"  # max_failed_hosts 0: the next domain never starts
    verified = _one(out, "verify_finished").details
    assert (verified["exit_code"], verified["stderr"]) == (3, "libvirtd is down\n")
    assert all(out.guests[g].status == "resumed" for g in ("td-a", "td-b"))


def test_a_failed_prepare_pauses_nothing(make):
    h = make(dict(STAGED, prepare=["sh", "-c", "echo no space left >&2; exit 1"]))
    out = run(h, hosts=["h1"], runbook="staged")

    assert (out.job.state, out.job.reason) == ("failed", "prepare_failed")
    assert "pausing" not in out.kinds() and not out.intents
    assert _one(out, "prepare_finished").details["stderr"] == "no space left\n"


def test_a_prepare_past_its_timeout_is_killed_and_pauses_nothing(make):
    h = make(dict(STAGED, prepare=["sleep", "30"], prepare_timeout_seconds=0.5))
    out = run(h, hosts=["h1"], runbook="staged")

    assert (out.job.state, out.job.reason) == ("failed", "prepare_failed")
    details = _one(out, "prepare_finished").details
    assert details["outcome"] == "timed_out" and details["duration_s"] < 3
    assert "pausing" not in out.kinds()


def test_a_runbook_with_only_argv_keeps_its_meaning(make):
    h = make({"argv": ["true"], "timeout_seconds": 5})
    out = run(h, hosts=["h1"], runbook="staged")

    assert out.job.state == "succeeded"
    assert not [k for k in out.kinds() if k.startswith(("prepare_", "verify_"))]


def test_a_later_host_waits_out_its_freeze(make):
    end = datetime.now(UTC) + timedelta(seconds=2)
    freeze = {"name": "h2-firmware", "start": "2026-01-01T00:00:00+00:00", "end": end.isoformat()}
    h = make({"argv": ["true"], "timeout_seconds": 5}, freezes=[dict(freeze, hosts=["h2"])])
    out = run(h, hosts=["h1", "h2"], runbook="staged")

    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    frozen = _one(out, "job_frozen")
    assert frozen.host == "h2" and "h2-firmware" in frozen.message
    items = _items(h, out.job.id)
    assert items["h1"].finished_at < end <= items["h2"].started_at
    assert items["h2"].started_at - end < timedelta(seconds=1)
