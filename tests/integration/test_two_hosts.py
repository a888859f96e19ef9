"""One job over two independent real libvirt daemons, maintained one update domain at a time."""

import pytest

from tests.conftest import QEMU_URI, make_harness, make_settings
from tests.integration.engine_helpers import run

pytestmark = pytest.mark.qemu


def test_hosts_are_maintained_by_update_domain(bed_guests, second_host, sqlite_url):
    session_uri, session_bed, session_guests = second_host
    settings = make_settings(
        [
            {"name": "system", "uri": QEMU_URI, "update_domain": 1},
            {"name": "session", "uri": session_uri, "update_domain": 0},
        ]
    )
    h = make_harness(sqlite_url, settings)
    try:
        out = run(h, hosts=["system", "session"], runbook="sleep", params={"seconds": "0.5"})
    finally:
        h.ctx.close()

    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    by_host = {}
    for g in out.job.guests:
        by_host.setdefault(g.host, []).append(g)
    assert {g.guest for g in by_host["session"]} == {g.name for g in session_guests}
    assert {g.guest for g in by_host["system"]} == {g.name for g in bed_guests}
    # Update domain 0 (session) is paused and resumed entirely before domain 1 is touched.
    assert max(g.resumed_at for g in by_host["session"]) < min(
        g.paused_at for g in by_host["system"]
    )
    assert all(g.sync_outcome == "ok" for g in out.job.guests)
    # The health gate between the domains pinged each real guest of domain 0 through its agent.
    (gate,) = [e for e in out.events if e.kind.startswith("gate_")]
    assert (gate.kind, gate.details["wave"]) == ("gate_passed", 0), gate.message
    assert gate.details["guests"] == len(session_guests)
    hosts_in_order = [e.host for e in out.events if e.kind == "pausing"]
    assert hosts_in_order == ["session", "system"]
    assert session_bed.counter(session_guests[0].name) >= 1
