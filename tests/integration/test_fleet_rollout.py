"""Rollouts over several real libvirt daemons, watched by a sampler that polls every 10 ms.

The hosts: the system daemon (three guests) and another user's session daemon (one guest), both
with real QEMU guests and the real agent. The sampler reads every guest's state through its own
connections; the assertions are on what it saw, and on maintctl's records.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from controller.decisions.rollout import RolloutPolicy
from controller.store.db import unit_of_work
from controller.store.models import JobHost
from tests.conftest import QEMU_URI, make_harness, make_settings
from tests.fleet import FleetSampler, WatchedHost, availability_set
from tests.integration.engine_helpers import run

pytestmark = pytest.mark.qemu


def _fleet(bed_guests, second_host, *, session_domain: int):
    session_uri, session_bed, session_guests = second_host
    watched = [
        WatchedHost("system", QEMU_URI, 0, tuple(g.name for g in bed_guests)),
        WatchedHost("session", session_uri, session_domain, tuple(g.name for g in session_guests)),
    ]
    hosts = [{"name": w.name, "uri": w.uri, "update_domain": w.update_domain} for w in watched]
    return watched, hosts, session_bed


def _items(h, job_id):
    with unit_of_work(h.session_factory) as s:
        rows = s.scalars(select(JobHost).where(JobHost.job_id == job_id))
        return {i.host: (i.state, i.outcome) for i in rows}


def test_one_domain_runs_its_hosts_at_once_within_the_availability_set_limit(
    bed, bed_guests, second_host, sqlite_url
):
    watched, hosts, session_bed = _fleet(bed_guests, second_host, session_domain=0)
    h = make_harness(sqlite_url, make_settings(hosts))
    system_web = [g.name for g in bed_guests[:2]]
    session_web = watched[1].guests[0]
    web = {("system", n) for n in system_web} | {("session", session_web)}
    try:
        with (
            availability_set(bed.domain(system_web[0]), "web"),
            availability_set(bed.domain(system_web[1]), "web"),
            availability_set(session_bed.domain(session_web), "web"),
        ):
            # No limit: both hosts of the domain are paused at the same time.
            with FleetSampler(watched) as free:
                out = run(h, hosts=["system", "session"], runbook="sleep", params={"seconds": "1"})
            assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
            # At most two web guests at once: system's two, then session's one.
            policy = RolloutPolicy(max_paused_per_availability_set=2)
            with FleetSampler(watched) as limited:
                out2 = run(
                    h,
                    hosts=["system", "session"],
                    runbook="sleep",
                    params={"seconds": "0.5"},
                    rollout=policy,
                )
            assert out2.job.state == "succeeded", (out2.job.reason, out2.job.detail)
    finally:
        h.ctx.close()

    # Every 10 ms; a stall of the sampler's own process (seen once: 0.38 s) is bounded too.
    assert free.median_period() < 0.02 and free.period() < 0.5, free.period()
    assert free.hosts_paused_at_once({"system", "session"}) == 2
    assert free.guests_paused_at_once(web) == 3
    assert free.ever_paused() == {(w.name, g) for w in watched for g in w.guests}
    assert limited.guests_paused_at_once(web) == 2
    assert limited.hosts_paused_at_once({"system", "session"}) == 1
    assert limited.ever_paused() == {(w.name, g) for w in watched for g in w.guests}
    assert not limited.last_paused() and not free.last_paused()
    assert all(g.status == "resumed" for g in out.job.guests + out2.job.guests)


def test_a_failed_health_gate_on_real_hosts_halts_the_later_domains(
    bed_guests, second_host, sqlite_url
):
    watched, hosts, _ = _fleet(bed_guests, second_host, session_domain=1)
    settings = make_settings(hosts)
    unhealthy = {
        # Long enough a pause that the 10 ms sampler cannot miss it when its process stalls.
        "argv": ["sleep", "0.3"],
        "timeout_seconds": 5,
        "check": ["sh", "-c", 'test "$MAINTCTL_HOST" != system'],
    }
    settings.runbooks["unhealthy"] = type(settings.runbooks["noop"]).model_validate(unhealthy)
    h = make_harness(sqlite_url, settings)
    try:
        with FleetSampler(watched) as seen:
            out = run(
                h,
                hosts=["system", "session"],
                runbook="unhealthy",
                rollout=RolloutPolicy(gate_timeout_seconds=1.0),
            )
        items = _items(h, out.job.id)
    finally:
        h.ctx.close()
    assert (out.job.state, out.job.reason) == ("failed", "gate_failed"), out.job.detail
    assert items["system"][0] == "done" and items["session"][0] == "skipped"
    # Domain 0 was maintained; nothing of domain 1 was ever paused.
    assert {g for h_, g in seen.ever_paused() if h_ == "system"} == set(watched[0].guests)
    assert not {g for h_, g in seen.ever_paused() if h_ == "session"}
    assert not seen.last_paused()
    (gate,) = [e for e in out.events if e.kind.startswith("gate_")]
    assert gate.kind == "gate_failed" and "system" in gate.message


def _remote_host_config(ssh_host, *, update_domain: int) -> dict:
    return {
        "name": "remote",
        "uri": ssh_host.libssh_uri,  # the allow-list refuses command= (ssh_uri's wrapper)
        "update_domain": update_domain,
        "patch_via": "ssh",
        "ssh": {
            "user": ssh_host.user,
            "port": ssh_host.port,
            "address": ssh_host.address,
            "key_file": str(ssh_host.key_file),
            "known_hosts": str(ssh_host.known_hosts),
            "local_uri": ssh_host.local_uri,
        },
    }


def test_a_rollout_over_three_hosts_one_remote_never_pauses_two_domains_at_once(
    bed_guests, second_host, ssh_host, ssh_guest, sqlite_url
):
    """system and remote (over SSH: libvirt, runbook and guardian) in domain 0, session in 1."""
    watched, hosts, _ = _fleet(bed_guests, second_host, session_domain=1)
    watched.append(WatchedHost("remote", ssh_host.root_uri, 0, (ssh_guest.name,)))
    hosts.append(_remote_host_config(ssh_host, update_domain=0))
    settings = make_settings(hosts)
    whoami = {"argv": ["sh", "-c", "id -un; sleep 0.5"], "timeout_seconds": 10}
    settings.runbooks["whoami"] = type(settings.runbooks["noop"]).model_validate(whoami)
    h = make_harness(sqlite_url, settings)
    try:
        with FleetSampler(watched) as seen:
            out = run(h, hosts=["system", "remote", "session"], runbook="whoami")
    finally:
        h.ctx.close()
    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    # Every 10 ms; a stall of the sampler's own process (seen once: 0.38 s) is bounded too.
    assert seen.median_period() < 0.02 and seen.period() < 0.5, seen.period()
    # Never two update domains paused at once; both hosts of domain 0 paused together.
    assert seen.domains_paused_at_once() == 1
    assert seen.hosts_paused_at_once({"system", "remote"}) == 2
    assert seen.ever_paused() == {(w.name, g) for w in watched for g in w.guests}
    assert not seen.last_paused()
    # The remote host's runbook ran there, as the ssh user; the local ones here, as root.
    ran_as = {
        e.host: e.details["stdout"].strip() for e in out.events if e.kind == "runbook_finished"
    }
    assert ran_as == {"system": "root", "remote": ssh_host.user, "session": "root"}
    remote = [g for g in out.job.guests if g.host == "remote"]
    assert [(g.status, g.sync_outcome) for g in remote] == [("resumed", "ok")]
