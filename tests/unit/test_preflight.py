import pytest

from controller.decisions.guests import GuestInfo, GuestState
from controller.decisions.preflight import BusyGuestPolicy, admit, classify_guests
from controller.decisions.rollout import host_order, update_domain_waves
from controller.errors import AdmissionRefused


def g(name, state=GuestState.RUNNING, reason="booted", job=None, optout=False):
    return GuestInfo(f"uuid-{name}", name, state, reason, job, optout)


def test_only_running_guests_that_did_not_opt_out_are_targets():
    guests = [
        g("web"),
        g("db", GuestState.PAUSED, "user"),
        g("old", GuestState.SHUTOFF, "shutdown"),
        g("opt", optout=True),
        g("ex"),
        g("backup", job="backup"),
    ]
    plan = classify_guests(guests, exclude=["ex"], busy=BusyGuestPolicy.SKIP)
    assert [t.name for t in plan.targets] == ["web"]
    reasons = {guest.name: why for guest, why in plan.skipped}
    assert reasons == {
        "db": "not running: paused (user)",
        "old": "not running: shutoff (shutdown)",
        "opt": "opted out in its libvirt metadata",
        "ex": "excluded by the job",
        "backup": "active libvirt job: backup",
    }
    assert plan.blockers == []


def test_busy_guest_blocks_when_the_job_says_so():
    plan = classify_guests(
        [g("a"), g("m", job="migration")], exclude=[], busy=BusyGuestPolicy.BLOCK
    )
    assert [t.name for t in plan.targets] == ["a"]
    assert [(b.name, why) for b, why in plan.blockers] == [("m", "active libvirt job: migration")]


def test_exclusion_by_uuid():
    plan = classify_guests([g("a"), g("b")], exclude=["uuid-b"], busy=BusyGuestPolicy.SKIP)
    assert [t.name for t in plan.targets] == ["a"]


def test_admission_refusal_gives_the_numbers():
    with pytest.raises(AdmissionRefused) as info:
        admit(runbook="kernel", runbook_timeout=28, resume_reserve=3, budget=30, budget_cap=30)
    msg = str(info.value)
    assert "28 s" in msg and "3 s" in msg and "31 s" in msg and "30 s" in msg


def test_admission_refuses_a_budget_over_the_cap():
    with pytest.raises(AdmissionRefused, match="exceeds the cap of 30 s"):
        admit(runbook="x", runbook_timeout=1, resume_reserve=1, budget=31, budget_cap=30)


def test_admission_accepts_an_exact_fit():
    admit(runbook="x", runbook_timeout=27, resume_reserve=3, budget=30, budget_cap=30)


class H:
    def __init__(self, name, ud):
        self.name, self.update_domain = name, ud


def test_hosts_go_by_update_domain_then_name():
    hosts = [H("c", 1), H("a", 2), H("b", 1), H("z", 0)]
    assert [h.name for h in host_order(hosts)] == ["z", "b", "c", "a"]
    assert [[h.name for h in w] for w in update_domain_waves(hosts)] == [["z"], ["b", "c"], ["a"]]
