"""Memory per job: the real service on the real bed, short jobs back to back, no fault.

    python -m bench.job_memory --jobs 300

The soak's growth check judges half an hour; this answers in minutes how much the controller
keeps per job. It boots --guests test-bed guests on the system libvirtd, starts `maintctl serve`
as the soak does (its runbooks, the guests' metadata listener, a scratch database of the test
PostgreSQL server), and submits 0 s nap jobs one after another through the API (each still
pauses every guest, syncs its clock and runs its freeze and thaw hooks through the agent). Every
--every jobs it reads the controller's RSS, anonymous memory, threads and descriptors from /proc.
At the end it prints a least-squares slope of the RSS in KB per job over the samples from job
--warmup on (a new process's caches and arenas fill in its first jobs).

Extra environment passes to the service: MALLOC_ARENA_MAX=2 or MALLOC_MMAP_THRESHOLD_=N in front
of the command compare glibc's settings (an operator's MALLOC_MMAP_THRESHOLD_ replaces the 64 KiB
that serve sets itself, cli/heap.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.fleet import scratch_database
from bench.soak import BUDGET, JOB_TIMEOUT, soak_service
from tests.conftest import FAULT_PG_URL
from tests.faults.conftest import TERMINAL


@dataclass
class Sample:
    job: int
    seconds: float
    rss_mb: float
    anon_mb: float
    threads: int
    fds: int


def measure(pid: int, job: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    anon = rollup.split("Anonymous:", 1)[1].split()[0]
    return Sample(
        job,
        round(time.monotonic() - started, 1),
        int(fields["VmRSS"].split()[0]) / 1024,
        int(anon) / 1024,
        int(fields["Threads"]),
        len(list(Path(f"/proc/{pid}/fd").iterdir())),
    )


def kb_per_job(samples: list[Sample], warmup: int) -> float | None:
    points = [(s.job, s.rss_mb * 1024) for s in samples if s.job >= warmup]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def run_job(api: httpx.Client, n: int) -> str:
    body = {
        "hosts": ["local"],
        "runbook": "nap",
        "params": {"seconds": "0"},
        "pause_budget_seconds": BUDGET,
    }
    r = api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": f"job-memory-{n}"})
    r.raise_for_status()
    job_id = r.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        state = str(api.get(f"/api/v1/jobs/{job_id}").json()["state"])
        if state in TERMINAL:
            return state
        time.sleep(0.05)
    return "timed out"


def main(argv: list[str] | None = None) -> int:
    from bench.pause import boot_guests

    p = argparse.ArgumentParser(prog="python -m bench.job_memory", description=__doc__)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--guests", type=int, default=5)
    p.add_argument("--database-url", default=FAULT_PG_URL)
    p.add_argument("--json", type=Path, help="write every sample here")
    args = p.parse_args(argv)

    bed, _guests = boot_guests(args.guests)
    samples: list[Sample] = []
    outcomes: dict[str, int] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="maintctl-job-memory-") as tmp,
            scratch_database(args.database_url, Path(tmp)) as db_url,
            soak_service(Path(tmp), db_url) as (service, _port, _secret),
        ):
            assert service.proc is not None
            pid, started = service.proc.pid, time.monotonic()
            headers = {"Authorization": f"Bearer {service.token('operator', 'job-memory')}"}
            with httpx.Client(base_url=service.url, headers=headers, timeout=10) as api:
                for n in range(1, args.jobs + 1):
                    state = run_job(api, n)
                    outcomes[state] = outcomes.get(state, 0) + 1
                    if n % args.every == 0 or n == 1:
                        s = measure(pid, n, started)
                        samples.append(s)
                        print(
                            f"job {s.job:5d} {s.seconds:7.1f} s  RSS {s.rss_mb:6.1f} MB  "
                            f"anon {s.anon_mb:6.1f} MB  threads {s.threads}  fds {s.fds}",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        try:
            bed.cleanup_stale()
        finally:
            bed.close()
    slope = kb_per_job(samples, args.warmup)
    print(f"jobs: {args.jobs} on {args.guests} guests, outcomes {outcomes}")
    print("| job | RSS (MB) | anonymous (MB) | threads | descriptors |\n|---|---|---|---|---|")
    for s in samples:
        print(f"| {s.job} | {s.rss_mb:.1f} | {s.anon_mb:.1f} | {s.threads} | {s.fds} |")
    print(
        f"RSS slope from job {args.warmup}: "
        + ("-" if slope is None else f"{slope:+.1f} KB per job")
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "outcomes": outcomes,
                    "kb_per_job": slope,
                    "samples": [asdict(s) for s in samples],
                },
                indent=2,
            )
        )
    return 0 if set(outcomes) <= {"succeeded"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
