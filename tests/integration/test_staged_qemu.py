"""On real QEMU guests: a long prepare step does not lengthen the pause; only apply is inside it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controller.settings import Settings
from tests.conftest import QEMU_URI, Harness, make_harness
from tests.integration.engine_helpers import run

pytestmark = pytest.mark.qemu

PREPARE_SECONDS = 5.0


@pytest.fixture
def harness(bed_guests, sqlite_url) -> Iterator[Harness]:
    settings = Settings(
        hosts=[{"name": "h1", "uri": QEMU_URI}],
        runbooks={
            "staged": {
                "prepare": ["sleep", str(PREPARE_SECONDS)],
                "prepare_timeout_seconds": 30,
                "apply": ["sleep", "0.5"],
                "timeout_seconds": 5,
                "verify": ["true"],
            }
        },
    )
    h = make_harness(sqlite_url, settings)
    yield h
    h.ctx.close()


def test_a_5_s_prepare_step_does_not_lengthen_the_pause(bed, bed_guests, harness):
    out = run(harness, runbook="staged")

    assert out.job.state == "succeeded", (out.job.reason, out.job.detail)
    prepared = next(e for e in out.events if e.kind == "prepare_finished").details
    applied = next(e for e in out.events if e.kind == "runbook_finished").details
    assert prepared["exit_code"] == 0 and prepared["duration_s"] >= PREPARE_SECONDS
    apply_ms = applied["duration_s"] * 1000
    assert apply_ms >= 500
    names = [g.name for g in bed_guests]
    print(f"prepare {prepared['duration_s']:.3f} s, apply {apply_ms:.1f} ms, pauses", end=" ")
    print({n: out.guests[n].pause_ms for n in names})
    for n in names:
        g = out.guests[n]
        # Measured from the guest's pause to its resume: the apply step plus at most 100 ms.
        assert apply_ms <= g.pause_ms < apply_ms + 100, (n, g.pause_ms, apply_ms)
        assert g.sync_outcome == "ok"
    assert [e.kind for e in out.events].index("verify_finished") > max(
        i for i, e in enumerate(out.events) if e.kind == "clock_synced"
    )
