"""Watch guest clocks after each maintctl cycle: do they drift or step after a verified sync?

    python -m bench.drift --guests 8 --cycles 10 --runbook sleep2 --watch 3

After each cycle it reads every guest's skew (guest clock minus host clock, through the agent
directly, not maintctl) over and over for --watch seconds, and prints per guest: the skew maintctl
recorded, the first and last independent reads, the drift rate between them and the largest
change between two consecutive reads. A line is flagged when the rate exceeds 1 ms/s, a step
exceeds 2 ms, or the first read is more than 3 ms off.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from bench.pause import RUNBOOKS, Sample, boot_guests, maintctl_context, maintctl_cycle
from controller.store.db import unit_of_work
from controller.store.models import Job
from tests.testbed import TestBed


def watch(bed: TestBed, names: list[str], seconds: float) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for name in names:
            _, skew, _ = bed.clock_offset(name, 3)
            series[name].append((time.monotonic() - started, skew))
    return series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift")
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--runbook", choices=sorted(RUNBOOKS), default="sleep2")
    parser.add_argument("--watch", type=float, default=3.0, help="seconds to watch after a cycle")
    args = parser.parse_args(argv)

    bed, names = boot_guests(args.guests)
    flagged = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = maintctl_context(Path(tmp), 64)
            for cycle in range(args.cycles):
                maintctl_cycle(ctx, args.runbook, Sample("maintctl", args.runbook), bed, names)
                with unit_of_work(ctx.session_factory) as s:
                    job = s.scalars(select(Job).order_by(Job.id.desc())).first()
                    assert job is not None
                    recorded = {g.guest: g.clock_skew_ms for g in job.guests}
                for name, reads in watch(bed, names, args.watch).items():
                    (t0, first), (t1, last) = reads[0], reads[-1]
                    rate = (last - first) / max(0.01, t1 - t0)
                    steps = [b - a for (_, a), (_, b) in itertools.pairwise(reads)]
                    step = max(steps, key=abs) if steps else 0.0
                    flag = abs(rate) > 1 or abs(step) > 2 or abs(first) > 3
                    flagged += flag
                    print(
                        f"cycle {cycle} {name}: recorded {recorded.get(name)} ms, "
                        f"first {first:.2f} last {last:.2f} ms, rate {rate:.2f} ms/s, "
                        f"largest step {step:.2f} ms{'  <<<' if flag else ''}",
                        flush=True,
                    )
                time.sleep(1)
            ctx.close()
    finally:
        bed.cleanup_stale()
    print(f"{flagged} flagged of {args.cycles * len(names)} guest-cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
