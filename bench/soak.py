"""Soak: the real service on the real bed for N minutes, jobs back to back, a fault every 1-3 min.

    python -m bench.soak --minutes 30 --seed 7 --plot docs/img/soak-30min.png

It boots --guests test-bed guests on the system libvirtd, starts `maintctl serve` on a scratch
database of the test PostgreSQL server (with its guardian and its guests' metadata listener),
and submits jobs through the API one after another: 1-2 s runbooks, some staged (prepare,
apply, verify), some with a notice that the guests' hooks approve, some approved early by a
guest through the metadata listener. Meanwhile, at times drawn from --seed, it injects one
fault after another (bench/soak_faults.py: libvirtd killed early or late in a job, the
controller killed with -9 or stopped with SIGTERM and started again, PostgreSQL restarted, a
guest's QEMU stopped past the budget, a guest agent hung); the controller's restarts only in
the run's first third, so that the last two thirds are one controller's life. An independent witness
(tests/faults/bed.py's Sampler) reads every guest's state every 50 ms, and every
--sample-seconds the bench measures the controller's, its listener's and the guardians'
memory, threads, descriptors and libvirt connections, and the database's size and events per
minute (bench/soak_resources.py).

At the end it waits for everything to settle and checks:
  pauses    no guest was paused longer than its budget, unless a fault made a resume
            impossible (libvirtd away, its QEMU stopped): then it ran within 5 s of the fault's end
  jobs      every submitted job reached a terminal state, with its events and every guest settled
  intents   no pause intent is left open
  growth    nothing grows: a least-squares slope over the last two thirds of the run, fitted
            within each controller process past its five-minute warm-up, and per guardian:
            RSS below 2 MB per 10 min, threads, descriptors, libvirt connections and guardians
            alive below 1 per 10 min; a run of 30 minutes or more must fit every figure
  leftovers no guardian process is left once every guest runs
It prints the counts and tables, and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.fleet import scratch_database
from bench.soak_faults import KINDS, Fault, Injector
from bench.soak_report import plot, report
from bench.soak_resources import (
    JUDGED_FROM_SECONDS,
    MIN_FLOORS,
    Recorder,
    measure_processes,
    slopes,
)
from bench.soak_result import Check, Pauses, Result, Submitted
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import PauseIntent
from controller.work.guest_documents import guest_token
from tests.conftest import FAULT_PG_URL, QEMU_URI
from tests.e2e.service import Service, free_port, host_block
from tests.faults.bed import FAULT_RUNBOOKS, Sampler, libvirtd_restored
from tests.faults.conftest import TERMINAL, read_records
from tests.testbed import TestBed

BUDGET = 8.0
BACK_WITHIN = 5.0  # a pause a fault stretched: running within 5 s of the fault's end
WITNESS_SLACK = 0.2  # the witness samples every 50 ms, at both ends of a pause
JOB_TIMEOUT = 150.0
SETTLE_TIMEOUT = 120.0
# Resource samples taken while a fault lasts, and this long after, are not fitted.
FAULT_SETTLE = 5.0

SOAK_CONFIG = r"""
[runbooks.staged]
prepare = ["sleep", "0.5"]
apply = ["sleep", "{{seconds}}"]
timeout_seconds = 4
verify = ["sleep", "0.3"]
[runbooks.staged.params]
seconds = '^[0-9](\.[0-9])?$'
[metadata]
bind = "127.0.0.1:{port}"
token_secret = "{secret}"
learn_addresses = []
"""

# The job mix, drawn from the seed: kinds and their weights.
JOB_KINDS = ("nap", "staged", "notice", "approved")
JOB_WEIGHTS = (4, 2, 2, 2)


def job_body(kind: str, rng: random.Random) -> dict[str, Any]:
    seconds = rng.choice(["1", "1.5", "2"])
    body: dict[str, Any] = {
        "hosts": ["local"],
        "runbook": "staged" if kind == "staged" else "nap",
        "params": {"seconds": seconds},
        "pause_budget_seconds": BUDGET,
    }
    if kind == "notice":  # the guests' freeze hooks approve it, or its notice runs out
        body["notice_seconds"] = rng.choice([3, 5])
    elif kind == "approved":  # a guest approves it through the metadata listener
        body["notice_seconds"] = 30
    return body


# --- the jobs ------------------------------------------------------------------------------------


@dataclass
class Driver:
    """Submits jobs one after another through the API, riding out the controller's and the
    database's absences (a retried submission carries the same Idempotency-Key)."""

    service: Service
    token: str
    listener: str
    guest_token: str
    seed: int
    jobs: list[Submitted] = field(default_factory=list)

    def run(self, end: float) -> None:
        rng = random.Random(f"{self.seed}-jobs")
        headers = {"Authorization": f"Bearer {self.token}"}
        with (
            httpx.Client(base_url=self.service.url, headers=headers, timeout=10) as api,
            httpx.Client(base_url=self.listener, timeout=5) as md,
        ):
            while time.monotonic() < end:
                job = Submitted(len(self.jobs) + 1, rng.choices(JOB_KINDS, JOB_WEIGHTS)[0])
                self.jobs.append(job)
                body = job_body(job.kind, rng)
                job.id = self._submit(api, job, body)
                if job.id is not None:
                    self._wait(api, md, job)

    def _submit(self, api: httpx.Client, job: Submitted, body: dict[str, Any]) -> int | None:
        key = {"Idempotency-Key": f"soak-{self.seed}-{job.n}"}
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            try:
                r = api.post("/api/v1/jobs", json=body, headers=key)
            except httpx.HTTPError:
                time.sleep(0.5)  # the controller is away
                continue
            if r.status_code in (200, 201):
                return int(r.json()["id"])
            if r.status_code < 500:
                job.error = f"submission refused: {r.status_code} {r.text[:200]}"
                return None
            time.sleep(0.5)  # the database is away: 503
        job.error = "not accepted within the job timeout"
        return None

    def _wait(self, api: httpx.Client, md: httpx.Client, job: Submitted) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            try:
                r = api.get(f"/api/v1/jobs/{job.id}")
                if r.status_code == 200:
                    job.state = r.json()["state"]
                    if job.state in TERMINAL:
                        return
                if job.kind == "approved" and not job.approved:
                    job.approved = self._approve(md)
            except httpx.HTTPError:
                pass
            time.sleep(0.25)  # with the approval's read: 4 a second, under the listener's 5

    def _approve(self, md: httpx.Client) -> bool:
        """The guest asks for its document and approves a Scheduled event it finds there."""
        headers = {"Metadata": "true", "Authorization": f"Bearer {self.guest_token}"}
        path = "/metadata/scheduledevents?api-version=2020-07-01"
        r = md.get(path, headers=headers)
        if r.status_code != 200:
            return False
        ids = [e["EventId"] for e in r.json()["Events"] if e["EventStatus"] == "Scheduled"]
        if not ids:
            return False
        body = {"StartRequests": [{"EventId": i} for i in ids]}
        return md.post(path, headers=headers, json=body).status_code == 200


# --- the checks ----------------------------------------------------------------------------------


def judge_pauses(witness: Sampler, faults: list[Fault], started: float) -> Pauses:
    out = Pauses()
    for guest, spans in witness.spans.items():
        for span in spans:
            out.count += 1
            at = span.paused - started
            if span.running is None:
                out.violations.append(f"{guest} still paused at the end (since {at:.1f} s)")
                continue
            seconds = span.running - span.paused
            out.longest_s = max(out.longest_s, seconds)
            if seconds <= BUDGET + WITNESS_SLACK:
                out.within_budget += 1
                out.longest_within_budget_s = max(out.longest_within_budget_s, seconds)
                continue
            blocking = [
                f
                for f in faults
                if f.blocks(guest)
                and f.ended is not None
                and f.started < span.paused + BUDGET
                and f.ended > span.paused
            ]
            if not blocking:
                out.violations.append(f"{guest} paused {seconds:.2f} s at {at:.1f} s, no fault")
                continue
            last = max(f.ended for f in blocking if f.ended is not None)
            after = span.running - last
            out.latest_after_fault_s = max(out.latest_after_fault_s or after, after)
            if after <= BACK_WITHIN + WITNESS_SLACK:
                out.stretched += 1
            else:
                kinds = ", ".join(f.kind for f in blocking)
                out.violations.append(
                    f"{guest} paused {seconds:.2f} s at {at:.1f} s, running {after:.2f} s after "
                    f"the end of {kinds}"
                )
    return out


SETTLED_EVENTS = ("guest_resumed", "guest_recovered")


def job_problems(db_url: str, job: Submitted) -> list[str]:
    """What is wrong with the job's records; notes its outcome (and events, but for a plain
    success) on it."""
    if job.id is None:
        return [f"job {job.n} ({job.kind}) never accepted: {job.error}"]
    records = read_records(db_url, job.id)
    state, reason = records.job["state"], records.job["reason"]
    job.outcome = state if reason is None else f"{state} ({reason})"
    if job.outcome != "succeeded":
        job.events = [
            f"{e['kind']}{'' if e['guest'] is None else ' ' + e['guest']}: {e['message']}"
            for e in records.events
        ]
    problems = []
    if state not in TERMINAL:
        problems.append(f"job {job.id} is {state}")
    kinds = records.kinds()
    for kind in ("job_created", f"job_{state}"):
        if kind not in kinds:
            problems.append(f"job {job.id} has no {kind} event")
    for guest, g in records.guests.items():
        if g["status"] in ("paused", "resume_pending"):
            problems.append(f"job {job.id}: {guest} is {g['status']}")
        elif g["status"] == "resumed" and not set(SETTLED_EVENTS) & set(records.kinds(guest)):
            problems.append(f"job {job.id}: {guest} resumed without a resume event")
    return problems


def open_intents(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with unit_of_work(make_session_factory(engine), read_only=True) as s:
            query = select(func.count()).where(PauseIntent.resolved_at.is_(None))
            return int(s.scalar(query) or 0)
    finally:
        engine.dispose()


# --- one soak ------------------------------------------------------------------------------------


@contextmanager
def soak_service(directory: Path, db_url: str) -> Iterator[tuple[Service, int, str]]:
    """The real `maintctl serve` with the fault suite's runbooks, the staged one and the
    guests' metadata listener; stopped at the end."""
    port, secret = free_port(), secrets.token_hex(24)
    service = Service(
        directory,
        hosts=host_block("local", QEMU_URI),
        db_url=db_url,
        extra=FAULT_RUNBOOKS + SOAK_CONFIG.format(port=port, secret=secret),
    )
    service.start()
    try:
        yield service, port, secret
    finally:
        service.stop()


def run_soak(
    *,
    minutes: float,
    seed: int,
    bed: TestBed,
    guests: list[str],
    pg_url: str = FAULT_PG_URL,
    sample_seconds: float = 10.0,
    fault_every: tuple[float, float] = (60.0, 180.0),
    kinds: tuple[str, ...] = KINDS,
    log: Callable[[str], None] = print,
    service_log: Path | None = None,
) -> Result:
    """One soak on guests that run on the bed; `service_log` gets a copy of serve's log."""
    with (
        tempfile.TemporaryDirectory(prefix="maintctl-soak-") as tmp,
        scratch_database(pg_url, Path(tmp)) as db_url,
        soak_service(Path(tmp), db_url) as (service, port, secret),
        libvirtd_restored(),
        Sampler(QEMU_URI, guests) as witness,
    ):
        driver = Driver(
            service,
            service.token("operator", "soak"),
            f"http://127.0.0.1:{port}",
            guest_token(secret, guests[0]),
            seed,
        )
        injector = Injector(service, bed, witness, BUDGET, seed, kinds, fault_every, log=log)
        started = time.monotonic()
        end = started + minutes * 60
        recorder = Recorder(
            started, lambda: service.proc.pid if service.proc else None, service.config,
            db_url, sample_seconds,
        )  # fmt: skip
        stop = threading.Event()
        threads = [
            threading.Thread(target=recorder.run, args=(stop.wait,), name="soak-recorder"),
            threading.Thread(target=injector.run, args=(started, end), name="soak-faults"),
        ]
        recorder.take()
        for t in threads:
            t.start()
        try:
            driver.run(end)
        finally:
            injector.stop()
            threads[1].join()
            stop.set()
            threads[0].join()
        log(f"{len(driver.jobs)} jobs, {len(injector.faults)} faults; settling")
        settle_s = settle(service, witness, db_url, driver.jobs)
        recorder.take()
        if service_log is not None:
            shutil.copyfile(service.log, service_log)
        return judge(
            minutes, seed, guests, driver, injector, witness, recorder, db_url, started, settle_s
        )


def settle(service: Service, witness: Sampler, db_url: str, jobs: list[Submitted]) -> float:
    """Wait until every job ended, every guest runs and every guardian left; return how long."""
    started = time.monotonic()
    pending = [j for j in jobs if j.id is not None]
    while time.monotonic() - started < SETTLE_TIMEOUT:
        pending = [j for j in pending if job_problems(db_url, j)]
        guardians = measure_processes(None, service.config)["guardians"].processes
        if not pending and witness.all_running() and guardians == 0:
            break
        time.sleep(1.0)
    return time.monotonic() - started


def judge(
    minutes: float,
    seed: int,
    guests: list[str],
    driver: Driver,
    injector: Injector,
    witness: Sampler,
    recorder: Recorder,
    db_url: str,
    started: float,
    settle_s: float,
) -> Result:
    outcomes: dict[str, Counter[str]] = {}
    problems: list[str] = []
    for job in driver.jobs:
        problems += job_problems(db_url, job)
        outcomes.setdefault(job.kind, Counter())[job.outcome or "never accepted"] += 1
    pauses = judge_pauses(witness, injector.faults, started)
    windows = [
        (f.started - started, (f.ended or f.started) - started + FAULT_SETTLE)
        for f in injector.faults
    ]
    fits = slopes(recorder.samples, duration=minutes * 60, faults=windows)
    intents = open_intents(db_url)
    guardians = recorder.samples[-1].processes["guardians"].processes
    growing = [s for s in fits if not s.ok]
    # A run long enough to fit must fit every figure: one that could not be (its process was
    # replaced too late, or faults covered its minutes) is a failed check, not a pass.
    unjudged = (
        [s for s in fits if s.per_10_min is None] if minutes * 60 >= JUDGED_FROM_SECONDS else []
    )
    checks = [
        Check(
            "pauses",
            not pauses.violations,
            f"{pauses.count} pauses: {pauses.within_budget} within the budget, "
            f"{pauses.stretched} stretched by a fault and running in time"
            + "".join(f"; {v}" for v in pauses.violations),
        ),
        Check(
            "jobs",
            not problems,
            f"{len(driver.jobs)} jobs" + "".join(f"; {p}" for p in problems[:20]),
        ),
        Check("intents", intents == 0, f"{intents} open"),
        Check(
            "growth",
            not growing and not unjudged,
            "; ".join(f"{s.role} {s.figure} {s.per_10_min:+.2f}/10 min" for s in growing)
            + "".join(f"; {s.role} {s.figure} not fitted ({s.points} minutes)" for s in unjudged)
            if growing or unjudged
            else "flat"
            if any(s.per_10_min is not None for s in fits)
            else f"not judged: fewer than {MIN_FLOORS} minutes to fit",
        ),
        Check("leftovers", guardians == 0, f"{guardians} guardian process(es) left"),
    ]
    faults = [
        {
            **{k: v for k, v in asdict(f).items() if k not in ("started", "ended")},
            "at_s": round(f.started - started, 1),
            "seconds": None if f.ended is None else round(f.ended - f.started, 2),
        }
        for f in injector.faults
    ]
    return Result(
        minutes,
        seed,
        guests,
        driver.jobs,
        {k: dict(v) for k, v in outcomes.items()},
        faults,
        pauses,
        fits,
        recorder.samples,
        checks,
        settle_s,
    )


# --- the command ---------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--guests", type=int, default=5)
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument(
        "--fault-every", type=float, nargs=2, default=(60.0, 180.0), metavar=("MIN", "MAX")
    )
    p.add_argument("--faults", default=",".join(KINDS), help="the kinds to draw from")
    p.add_argument(
        "--database-url",
        default=FAULT_PG_URL,
        help="the PostgreSQL server (a scratch database); its restarts are the faults cluster's",
    )
    p.add_argument("--plot", type=Path, help="write a PNG of every resource over the run")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--service-log", type=Path, help="keep a copy of the service's log here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.pause import boot_guests

    args = parse(argv)
    kinds = tuple(args.faults.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    bed, names = boot_guests(args.guests)
    try:
        result = run_soak(
            minutes=args.minutes,
            seed=args.seed,
            bed=bed,
            guests=names,
            pg_url=args.database_url,
            sample_seconds=args.sample_seconds,
            fault_every=tuple(args.fault_every),
            kinds=kinds,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            service_log=args.service_log,
        )
        # Written before the guests go: half an hour's figures never hang on a cleanup.
        print(report(result, command="python -m bench.soak " + " ".join(argv or sys.argv[1:])))
        if args.json is not None:
            args.json.write_text(json.dumps(as_json(result), indent=2, default=str))
        if args.plot is not None:
            plot(result, args.plot)
    finally:
        try:
            bed.cleanup_stale()
        finally:
            bed.close()
    return 0 if result.ok else 1


def as_json(result: Result) -> dict[str, Any]:
    return {
        "minutes": result.minutes,
        "seed": result.seed,
        "guests": result.guests,
        "outcomes": result.outcomes,
        "faults": result.faults,
        "pauses": asdict(result.pauses),
        "slopes": [asdict(s) for s in result.slopes],
        "checks": [asdict(c) for c in result.checks],
        "jobs": [asdict(j) for j in result.jobs],
        "samples": [asdict(s) for s in result.samples],
    }


if __name__ == "__main__":
    sys.exit(main())
