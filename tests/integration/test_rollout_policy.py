"""When a failed host halts a rollout: max_failed_hosts and continue_on_failure, on test:///."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from controller.decisions.rollout import RolloutPolicy
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import JobHost
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
        runbooks={"patch": {"argv": FAIL_ON_H2, "timeout_seconds": 5}},
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
    assert out.job.rollout == {"max_failed_hosts": 0, "continue_on_failure": True}
