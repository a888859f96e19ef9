"""Three minutes of the soak (bench/soak.py) in `make test`: jobs back to back through the API
and a fault every 20-30 s on the real bed, judged by the soak's own checks. The 30-minute run is
in docs/benchmarks.md#soak."""

from __future__ import annotations

import pytest

from bench.soak import run_soak
from bench.soak_report import report

pytestmark = [pytest.mark.qemu, pytest.mark.postgres, pytest.mark.faults]

SEED = 3
MINUTES = 3.0
# What seed 3 draws first (bench/soak_faults.py's bag, the controller's restarts in the first
# minute): at least these come within 3 minutes.
MUST_COME = {"controller-sigterm", "controller-kill9", "libvirtd-early", "postgres-restart"}


@pytest.mark.timeout(420)
def test_three_minutes_of_jobs_and_faults(bed, bed_guests) -> None:
    result = run_soak(
        minutes=MINUTES,
        seed=SEED,
        bed=bed,
        guests=[g.name for g in bed_guests],
        sample_seconds=5.0,
        fault_every=(20.0, 30.0),
    )
    print(report(result, command=f"tests/faults/test_soak.py (seed {SEED})"))
    injected = {f["kind"] for f in result.faults if not f["error"]}
    assert injected >= MUST_COME, result.faults
    assert len(result.jobs) >= 10
    for check in result.checks:
        assert check.ok, f"{check.name}: {check.detail}"
