"""The hosts of one update domain at once: max_parallel_hosts and availability-set batches.

Each host is a test:/// node file of its own, so every host has its own guests (test:///default
would be one host seen under several names). The pause windows come from the engine's records.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select

from controller.decisions.guests import GuestState
from controller.decisions.rollout import RolloutPolicy
from controller.services.jobs import JobRequest, plan
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import JobHost
from tests.conftest import make_harness, write_test_host
from tests.integration.engine_helpers import run

# host -> (update domain, {guest: availability set})
FLEET = {
    "h1": (0, {"web1": "web", "db1": "db", "x1": None}),
    "h2": (0, {"web2": "web", "db2": "db"}),
    "h3": (0, {"web3": "web"}),
    "h4": (1, {"web4": "web", "x4": None}),
}


def harness(db_url, tmp_path, fleet):
    hosts = [
        {
            "name": name,
            "uri": write_test_host(tmp_path, name, guests),
            "sync_clock": False,
            "update_domain": domain,
        }
        for name, (domain, guests) in fleet.items()
    ]
    settings = Settings(
        hosts=hosts,
        runbooks={"patch": {"argv": ["sleep", "0.4"], "timeout_seconds": 5}},
        maintenance={"allow_test_driver": True},
    )
    return make_harness(db_url, settings)


@pytest.fixture
def h(db_url, tmp_path):
    made = harness(db_url, tmp_path, FLEET)
    yield made
    made.ctx.close()


Window = tuple[datetime, datetime]


def windows(out) -> dict[str, list[tuple[str, Window]]]:
    """Per host: each guest's (name, (paused_at, resumed_at))."""
    by_host: dict[str, list[tuple[str, Window]]] = {}
    for g in out.job.guests:
        assert g.paused_at is not None and g.resumed_at is not None, g.guest
        by_host.setdefault(g.host, []).append((g.guest, (g.paused_at, g.resumed_at)))
    return by_host


def span(ws: list[tuple[str, Window]]) -> Window:
    return min(w[0] for _, w in ws), max(w[1] for _, w in ws)


def overlap(a: Window, b: Window) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def max_paused_at_once(out, guests: set[str]) -> int:
    """The most of these guests paused at one instant, from the recorded windows."""
    marks = []
    for g in out.job.guests:
        if g.guest in guests:
            marks += [(g.paused_at, 1), (g.resumed_at, -1)]
    live = peak = 0
    for _, step in sorted(marks, key=lambda m: (m[0], m[1])):  # a resume before a pause
        live += step
        peak = max(peak, live)
    return peak


def items(h, job_id) -> dict[str, tuple[str, str | None, str | None]]:
    with unit_of_work(h.session_factory) as s:
        rows = s.scalars(select(JobHost).where(JobHost.job_id == job_id))
        return {i.host: (i.state, i.outcome, i.detail) for i in rows}


def test_the_hosts_of_a_domain_run_at_once_and_domains_never_overlap(h):
    out = run(h, hosts=list(FLEET), runbook="patch")
    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    w = {host: span(ws) for host, ws in windows(out).items()}
    # Domain 0's three hosts were paused at the same time ...
    assert overlap(w["h1"], w["h2"]) and overlap(w["h2"], w["h3"]) and overlap(w["h1"], w["h3"])
    # ... and all of domain 0 was back before anything of domain 1 was paused.
    assert max(w[n][1] for n in ("h1", "h2", "h3")) < w["h4"][0]
    # Every guest of every host is running again, seen through the engine's own connections.
    for host in h.settings.hosts:
        states = {g.state for g in h.ctx.hypervisors.get(host.uri).list_guests()}
        assert states == {GuestState.RUNNING}, host.name


def test_max_parallel_hosts_one_maintains_a_domain_host_by_host(h):
    out = run(h, hosts=list(FLEET), runbook="patch", rollout=RolloutPolicy(max_parallel_hosts=1))
    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    w = {host: span(ws) for host, ws in windows(out).items()}
    assert w["h1"][1] < w["h2"][0] and w["h2"][1] < w["h3"][0] and w["h3"][1] < w["h4"][0]


def test_the_availability_set_limit_splits_a_domain_into_batches(h):
    policy = RolloutPolicy(max_paused_per_availability_set=2)
    with unit_of_work(h.session_factory) as s:
        request = JobRequest(hosts=list(FLEET), runbook="patch", rollout=policy)
        dry = plan(s, h.settings, h.ctx.hypervisors, request)
    # web: h1, h2, h3 have one each: at most two of them at once.
    assert [w.batches for w in dry.waves] == [[["h1", "h2"], ["h3"]], [["h4"]]]

    out = run(h, hosts=list(FLEET), runbook="patch", rollout=policy)
    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    web = {g for _, (_, guests) in FLEET.items() for g, s in guests.items() if s == "web"}
    assert max_paused_at_once(out, web) == 2
    w = {host: span(ws) for host, ws in windows(out).items()}
    assert overlap(w["h1"], w["h2"]) and w["h2"][1] < w["h3"][0]


def test_a_host_with_more_guests_of_a_set_than_the_limit_fails_before_anything_is_paused(
    db_url, tmp_path
):
    fleet = {**FLEET, "h0": (0, {"w0a": "web", "w0b": "web"})}
    h = harness(db_url, tmp_path, fleet)
    policy = RolloutPolicy(max_paused_per_availability_set=1)
    try:
        with unit_of_work(h.session_factory) as s:
            request = JobRequest(hosts=list(fleet), runbook="patch", rollout=policy)
            dry = plan(s, h.settings, h.ctx.hypervisors, request)
        assert dry.waves[0].batches == [["h1"], ["h2"], ["h3"]]
        assert "2 guests of availability set 'web'" in dry.waves[0].refused["h0"]

        out = run(h, hosts=list(fleet), runbook="patch", rollout=policy)
    finally:
        h.ctx.close()
    assert (out.job.state, out.job.reason) == ("failed", "availability_set_limit")
    assert all(g.paused_at is None for g in out.job.guests), "nothing may have been paused"
    progress = items(h, out.job.id)
    assert progress["h0"][:2] == ("failed", "availability_set_limit")
    assert {progress[n][0] for n in ("h1", "h2", "h3", "h4")} == {"skipped"}, progress
