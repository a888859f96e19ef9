"""Selecting a job's hosts: by name, "all", or labels; resolved once, planned in waves."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from controller.errors import InvalidRequest
from controller.services.jobs import JobRequest, plan, submit
from controller.store.db import unit_of_work
from controller.store.models import Event, JobHost
from tests.conftest import TEST_URI, make_harness, make_settings


def _hosts():
    def host(name, domain, **labels):
        return {
            "name": name,
            "uri": TEST_URI,
            "sync_clock": False,
            "update_domain": domain,
            "labels": labels,
        }

    return [
        host("r12-a", 0, rack="r12", gen="g9"),
        host("r12-b", 1, rack="r12", gen="g10"),
        host("r13-a", 0, rack="r13", gen="g10"),
        host("r13-b", 2, rack="r13"),
    ]


@pytest.fixture
def h(db_url):
    return make_harness(db_url, make_settings(_hosts()))


def _submit(h, **kw) -> tuple[list[str], list[tuple[str, int]], str]:
    with unit_of_work(h.session_factory) as s:
        job = submit(s, h.settings, JobRequest(runbook="noop", **kw), actor="t")
        items = [
            (i.host, i.wave)
            for i in s.scalars(
                select(JobHost).where(JobHost.job_id == job.id).order_by(JobHost.position)
            )
        ]
        created = s.scalars(
            select(Event).where(Event.job_id == job.id, Event.kind == "job_created")
        ).one()
        return list(job.host_names), items, created.details["selected_by"]


def test_all_selects_every_host_and_labels_select_those_carrying_every_label(h):
    names, items, how = _submit(h, hosts=[], all_hosts=True)
    assert sorted(names) == ["r12-a", "r12-b", "r13-a", "r13-b"] and how == "all"
    assert sorted(items) == [("r12-a", 0), ("r12-b", 1), ("r13-a", 0), ("r13-b", 2)]
    names, _, how = _submit(h, hosts=[], labels={"rack": "r12"})
    assert names == ["r12-a", "r12-b"] and how == "labels rack=r12"
    names, _, _ = _submit(h, hosts=[], labels={"gen": "g10", "rack": "r13"})
    assert names == ["r13-a"]
    names, _, how = _submit(h, hosts=["r13-b", "r12-a"])
    assert names == ["r13-b", "r12-a"] and how == "named"


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"hosts": [], "labels": {"rack": "r99"}}, "labels: no host carries rack=r99"),
        ({"hosts": [], "labels": {}}, "labels: give at least one label"),
        ({"hosts": ["r12-a"], "all_hosts": True}, "exactly one"),
        ({"hosts": ["r12-a"], "labels": {"rack": "r12"}}, "exactly one"),
        ({"hosts": []}, "exactly one"),
        ({"hosts": ["r12-a", "r12-a"]}, "named twice"),
        ({"hosts": ["nope"]}, "unknown host(s): nope"),
    ],
)
def test_a_selection_that_selects_nothing_or_two_ways_is_refused(h, kw, says):
    with unit_of_work(h.session_factory) as s, pytest.raises(InvalidRequest) as err:
        submit(s, h.settings, JobRequest(runbook="noop", **kw), actor="t")
    assert says in str(err.value)


def test_the_dry_run_plans_one_wave_per_update_domain(h):
    with unit_of_work(h.session_factory) as s:
        p = plan(
            s, h.settings, h.ctx.hypervisors, JobRequest(hosts=[], runbook="noop", all_hosts=True)
        )
    assert [(w.update_domain, w.hosts) for w in p.waves] == [
        (0, ["r12-a", "r13-a"]),
        (1, ["r12-b"]),
        (2, ["r13-b"]),
    ]
    assert p.hosts == ["r12-a", "r13-a", "r12-b", "r13-b"]
