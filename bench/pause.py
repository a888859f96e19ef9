"""Pause-window benchmark: maintctl's engine against the naive virsh loop, in the same run.

    python -m bench.pause --guests 8 --cycles 3

For each method and runbook (a no-op and a 2 s sleep) it runs K maintenance cycles over N real
test-bed guests and reports, per guest and cycle:
  overhead   pause duration minus runbook duration (pause = from the suspend request to the
             confirmed resume, an upper bound of the time the guest was stopped)
  spread     time between the first and the last guest's suspend request
  skew       |guest clock - host clock| after the sync, read independently through
             guest-get-time right after the cycle
  engine     the skew maintctl itself recorded for the guest, and its largest difference from
             the independent read (they should agree within the two reads' errors)
Methods: maintctl (the engine, thread fan-out), maintctl-serial (the same engine with one worker
thread: the sequential alternative), virsh (suspend loop, runbook, resume loop, domtime --sync),
and libvirt-floor: bare libvirt-python calls, one thread per guest, no state checks, no records,
no clock sync: what this machine's libvirtd and QEMU take at the least, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt
from sqlalchemy import select

from controller.cycle.runtime import Runtime
from controller.daemon.scheduler import MaintenanceScheduler
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services import jobs
from controller.services.inventory import sync_config_hosts
from controller.settings import Settings
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.models import Event, Job
from tests.testbed import SYSTEM_URI, TestBed

RUNBOOKS = {"noop": ["true"], "sleep2": ["sleep", "2"]}


@dataclass
class Sample:
    method: str
    runbook: str
    overhead_ms: list[float] = field(default_factory=list)
    spread_ms: list[float] = field(default_factory=list)
    skew_ms: list[float] = field(default_factory=list)
    # Half the round trip of each skew read: the most the read itself can be off.
    skew_error_ms: list[float] = field(default_factory=list)
    # maintctl only: the skew the engine recorded, and |engine - independent read| per guest.
    engine_skew_ms: list[float] = field(default_factory=list)
    disagreement_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | str]:
        return {
            "method": self.method,
            "runbook": self.runbook,
            "overhead_median_ms": round(statistics.median(self.overhead_ms), 1),
            "overhead_max_ms": round(max(self.overhead_ms), 1),
            "spread_median_ms": round(statistics.median(self.spread_ms), 1),
            "spread_max_ms": round(max(self.spread_ms), 1),
            "skew_median_abs_ms": (
                round(statistics.median(abs(s) for s in self.skew_ms), 2) if self.skew_ms else "-"
            ),
            "skew_max_abs_ms": _max_abs(self.skew_ms),
            "skew_read_error_max_ms": _max_abs(self.skew_error_ms),
            "engine_skew_max_ms": _max_abs(self.engine_skew_ms),
            "engine_disagreement_max_ms": _max_abs(self.disagreement_ms),
        }


def _max_abs(values: list[float]) -> float | str:
    return round(max(abs(v) for v in values), 2) if values else "-"


def independent_skews(bed: TestBed, names: list[str], reads: int = 5) -> list[tuple[float, float]]:
    """(skew ms, read error bound ms) per guest, read through the agent directly, not maintctl."""
    return [bed.clock_offset(name, reads)[1:] for name in names]


def maintctl_context(db_dir: Path, workers: int) -> Runtime:
    url = f"sqlite:///{db_dir / f'bench-{workers}.db'}"
    upgrade(url)
    settings = Settings(
        hosts=[{"name": "local", "uri": SYSTEM_URI}],
        database={"url": url, "journal_path": db_dir / f"bench-{workers}.journal"},
        runbooks={name: {"argv": argv, "timeout_seconds": 10} for name, argv in RUNBOOKS.items()},
    )
    factory = make_session_factory(make_engine(url))
    with unit_of_work(factory) as s:
        sync_config_hosts(s, settings)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guest-op")
    return Runtime(
        settings=settings,
        session_factory=factory,
        hypervisors=HypervisorPool(LibvirtHost),
        pool=pool,
    )


def maintctl_cycle(
    ctx: Runtime, runbook: str, sample: Sample, bed: TestBed, names: list[str]
) -> None:
    with unit_of_work(ctx.session_factory) as s:
        job_id = jobs.submit(
            s,
            ctx.settings,
            jobs.JobRequest(hosts=["local"], runbook=runbook, notice_seconds=0),  # no notice
            actor="bench",
        ).id
    MaintenanceScheduler(ctx).start_now(job_id)
    skews = independent_skews(bed, names)
    with unit_of_work(ctx.session_factory) as s:
        job = s.get_one(Job, job_id)
        if job.state not in ("succeeded", "succeeded_with_warnings"):
            raise RuntimeError(f"job {job_id} ended {job.state}: {job.detail}")
        for g in job.guests:
            if g.sync_outcome != "ok":
                print(
                    f"  warning: {g.guest}: clock sync {g.sync_outcome} "
                    f"(skew {g.clock_skew_ms} ms)",
                    file=sys.stderr,
                )
        for e in s.scalars(
            select(Event).where(Event.job_id == job_id, Event.kind == "clock_sync_failed")
        ):
            print(f"  {e.message}: {e.details.get('error')}", file=sys.stderr)
        finished = s.scalars(
            select(Event).where(Event.job_id == job_id, Event.kind == "runbook_finished")
        ).one()
        runbook_ms = finished.details["duration_s"] * 1000
        independent = {name: skew for name, (skew, _) in zip(names, skews, strict=True)}
        for g in job.guests:
            if g.clock_skew_ms is not None:
                sample.engine_skew_ms.append(g.clock_skew_ms)
                sample.disagreement_ms.append(g.clock_skew_ms - independent[g.guest])
        guests = [g for g in job.guests if g.pause_ms is not None]
        sample.overhead_ms += [g.pause_ms - runbook_ms for g in guests]
        starts = [g.paused_at for g in guests]
        sample.spread_ms.append((max(starts) - min(starts)).total_seconds() * 1000)
    sample.skew_ms += [skew for skew, _ in skews]
    sample.skew_error_ms += [err for _, err in skews]


def libvirt_floor_cycle(runbook: str, sample: Sample, names: list[str]) -> None:
    """Suspend every guest at once, run the runbook, resume every guest at once; nothing else."""
    conn = libvirt.open(SYSTEM_URI)
    try:
        doms = [conn.lookupByName(name) for name in names]
        requested: dict[str, float] = {}
        resumed: dict[str, float] = {}

        def suspend(dom: libvirt.virDomain) -> None:
            requested[dom.name()] = time.monotonic()
            dom.suspend()

        def resume(dom: libvirt.virDomain) -> None:
            dom.resume()
            resumed[dom.name()] = time.monotonic()

        with ThreadPoolExecutor(len(doms)) as pool:
            list(pool.map(suspend, doms))
            started = time.monotonic()
            subprocess.run(RUNBOOKS[runbook], check=True)
            runbook_ms = (time.monotonic() - started) * 1000
            list(pool.map(resume, doms))
    finally:
        conn.close()
    sample.overhead_ms += [(resumed[n] - requested[n]) * 1000 - runbook_ms for n in names]
    sample.spread_ms.append((max(requested.values()) - min(requested.values())) * 1000)


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", SYSTEM_URI, *args], check=True, capture_output=True)


def virsh_cycle(runbook: str, sample: Sample, bed: TestBed, names: list[str]) -> None:
    """What an operator would script: suspend each, patch, resume each, sync each."""
    requested = {}
    for name in names:
        requested[name] = time.monotonic()
        virsh("suspend", name)
    started = time.monotonic()
    subprocess.run(RUNBOOKS[runbook], check=True)
    runbook_ms = (time.monotonic() - started) * 1000
    resumed = {}
    for name in names:
        virsh("resume", name)
        resumed[name] = time.monotonic()
    for name in names:
        virsh("domtime", name, "--sync")
    skews = independent_skews(bed, names)
    sample.skew_ms += [skew for skew, _ in skews]
    sample.skew_error_ms += [err for _, err in skews]
    sample.overhead_ms += [(resumed[n] - requested[n]) * 1000 - runbook_ms for n in names]
    sample.spread_ms.append((max(requested.values()) - min(requested.values())) * 1000)


def table(rows: list[dict[str, float | str]]) -> str:
    cols = [
        "method",
        "runbook",
        "overhead_median_ms",
        "overhead_max_ms",
        "spread_median_ms",
        "spread_max_ms",
        "skew_median_abs_ms",
        "skew_max_abs_ms",
        "skew_read_error_max_ms",
        "engine_skew_max_ms",
        "engine_disagreement_max_ms",
    ]
    heads = [
        "method",
        "runbook",
        "overhead median",
        "overhead max",
        "spread median",
        "spread max",
        "abs skew median",
        "abs skew max",
        "read error max",
        "engine skew max",
        "engine vs read max",
    ]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def boot_guests(count: int) -> tuple[TestBed, list[str]]:
    """Boot `count` fresh test-bed guests for a benchmark (the caller cleans up with the bed)."""
    bed = TestBed(SYSTEM_URI)
    bed.cleanup_stale()
    names = [f"mtbed-bench-{i}" for i in range(1, count + 1)]
    print(f"booting {len(names)} guests ...", file=sys.stderr)
    bed.boot(names)
    time.sleep(3)  # let the guests settle after boot
    return bed, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pause")
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    bed, names = boot_guests(args.guests)
    samples: list[Sample] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            contexts = {
                "maintctl": maintctl_context(Path(tmp), 64),
                "maintctl-serial": maintctl_context(Path(tmp), 1),
            }
            for runbook in RUNBOOKS:
                for method in ("libvirt-floor", "maintctl", "maintctl-serial", "virsh"):
                    sample = Sample(method, runbook)
                    for cycle in range(args.cycles):
                        print(
                            f"{method} {runbook} cycle {cycle + 1}/{args.cycles}", file=sys.stderr
                        )
                        if method == "libvirt-floor":
                            libvirt_floor_cycle(runbook, sample, names)
                        elif method == "virsh":
                            virsh_cycle(runbook, sample, bed, names)
                        else:
                            maintctl_cycle(contexts[method], runbook, sample, bed, names)
                        time.sleep(1)
                    samples.append(sample)
            for ctx in contexts.values():
                ctx.close()
    finally:
        bed.cleanup_stale()
    rows = [s.summary() for s in samples]
    result = {
        "guests": args.guests,
        "cycles": args.cycles,
        "results": rows,
        "raw": [asdict(s) for s in samples],
    }
    print(f"\n{args.guests} guests, {args.cycles} cycles per row, all figures in ms\n")
    print(table(rows))
    print()
    print(json.dumps({"guests": args.guests, "cycles": args.cycles, "results": rows}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
