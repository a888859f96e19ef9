"""History benchmark: the read endpoints over a database of a million events, then a prune.

    python -m bench.history --events 1000000 --runs 3
    python -m bench.history --events 1000000 --runs 3 \\
        --database-url postgresql+psycopg://maintctl:maintctl@127.0.0.1:5432/maintctl

The bench writes the history itself: nightly jobs over a fleet of --fleet-hosts hosts
(--guests-per-host guests each) in update domains of 10, each job taking --job-hosts hosts in
two waves, with the records a real cycle leaves (events with their details, one outcome and one
resolved pause intent per guest, one item per host, a few webhook deliveries, which belong to
no job), spread over the last --days days, until it holds --events events. It goes into SQLite in
a temporary directory, or into a scratch database on the PostgreSQL server of --database-url
(created, and dropped at the end).

Each run starts the real service (`maintctl serve`, a process of its own, the hosts on libvirt's
test driver) on that database, asks each endpoint 3 times to warm up, then --requests times in
turn, over HTTP with a viewer token, and reads each answer's time on the client. The goal (issue
23): every answer within 200 ms.

Then, with the service stopped, a prune of everything older than --prune-days days
(controller/services/retention.py, its default batch size) while a writer commits one event
every 20 ms: the rows removed, the transactions, the longest one (the longest the write lock
was held), and the longest a writer's commit waited.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from bench.fleet import scratch_database
from controller.services.retention import BATCH_SIZE, prune
from controller.services.tokens import Role, create_token
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.events import record_event
from controller.store.models import (
    Event,
    Guest,
    Host,
    Job,
    JobGuest,
    JobHost,
    PauseIntent,
    utcnow,
)

GOAL_MS = 200.0
CHUNK = 20_000  # rows per insert transaction while building
ENDPOINTS = ("/api/v1/dashboard", "/dashboard", "/api/v1/jobs", "job events", "/metrics")


# --- the history -------------------------------------------------------------------------------


@dataclass
class Shape:
    fleet_hosts: int
    guests_per_host: int
    job_hosts: int
    days: float

    @property
    def domains(self) -> int:
        return max(1, self.fleet_hosts // 10)

    def host(self, n: int) -> str:
        return f"hv{n % self.fleet_hosts:04d}"


class _Rows:
    """Rows waiting to be inserted, flushed CHUNK at a time in their own transactions."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.pending: dict[Any, list[dict[str, Any]]] = {}
        self.events = 0

    def add(self, model: Any, row: dict[str, Any]) -> None:
        self.pending.setdefault(model, []).append(row)
        if model is Event:
            self.events += 1
        if sum(len(v) for v in self.pending.values()) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        with unit_of_work(self.factory) as s:
            for model in (Event, JobHost, JobGuest, PauseIntent):
                rows = self.pending.pop(model, [])
                if rows:
                    s.execute(insert(model), rows)


def _event(rows: _Rows, at: datetime, kind: str, job_id: int | None, **kw: Any) -> None:
    rows.add(
        Event,
        {
            "at": at,
            "kind": kind,
            "job_id": job_id,
            "host": kw.pop("host", None),
            "guest": kw.pop("guest", None),
            "actor": kw.pop("actor", "controller"),
            "message": kw.pop("message", kind.replace("_", " ")),
            "details": kw,
        },
    )


def _host_cycle(
    rows: _Rows, shape: Shape, job_id: int, host: str, wave: int, at: datetime, rnd: random.Random
) -> None:
    """One host's records: items, events, guest outcomes and intents, as a cycle leaves them."""
    g = shape.guests_per_host
    guests = [(f"{host}-vm{i:02d}", str(uuid.UUID(int=rnd.getrandbits(128)))) for i in range(g)]
    paused, resumed = at + timedelta(seconds=1), at + timedelta(seconds=3)
    rows.add(
        JobHost,
        {
            "job_id": job_id,
            "host": host,
            "wave": wave,
            "position": 0,
            "state": "done",
            "started_at": at,
            "finished_at": resumed + timedelta(seconds=1),
            "outcome": "done",
        },
    )
    _event(rows, at, "preflight_done", job_id, host=host, guests=g, message=f"{g} guest(s)")
    _event(rows, at, "pausing", job_id, host=host, guests=[n for n, _ in guests])
    for name, uid in guests:
        _event(rows, paused, "guest_paused", job_id, host=host, guest=name, uuid=uid)
    _event(rows, paused, "runbook_started", job_id, host=host, pid=rnd.randint(1000, 99999))
    _event(rows, resumed, "runbook_finished", job_id, host=host, exit=0, duration_s=2.0)
    for name, uid in guests:
        pause_ms = round(rnd.uniform(2010, 2090), 3)
        skew_ms = round(rnd.uniform(-1.5, 1.5), 3)
        _event(rows, resumed, "guest_resumed", job_id, host=host, guest=name, pause_ms=pause_ms)
        _event(rows, resumed, "clock_synced", job_id, host=host, guest=name, skew_ms=skew_ms)
        rows.add(
            JobGuest,
            {
                "job_id": job_id,
                "host": host,
                "guest": name,
                "guest_uuid": uid,
                "paused_at": paused,
                "resumed_at": resumed,
                "pause_ms": pause_ms,
                "clock_skew_ms": skew_ms,
                "sync_method": "set_time",
                "sync_outcome": "ok",
                "status": "resumed",
            },
        )
        rows.add(
            PauseIntent,
            {
                "job_id": job_id,
                "host": host,
                "host_uri": "test:///default",
                "guest": name,
                "guest_uuid": uid,
                "created_at": paused,
                "resolved_at": resumed,
                "resolution": "resumed",
            },
        )


def build_history(url: str, *, events: int, shape: Shape, seed: int = 1) -> dict[str, Any]:
    """Fill an empty, migrated database with about `events` events; return what it holds."""
    factory = make_session_factory(make_engine(url))
    rnd = random.Random(seed)
    per_job = shape.job_hosts * (3 * shape.guests_per_host + 4) + 2 * 2 + 6
    jobs = max(1, events // per_job)
    started = time.monotonic()
    now = utcnow()
    step = timedelta(days=shape.days) / jobs
    with unit_of_work(factory) as s:
        for n in range(shape.fleet_hosts):
            s.add(Host(name=shape.host(n), uri="test:///default", update_domain=n // 10))
        s.flush()
        for h in s.scalars(select(Host)):
            for i in range(shape.guests_per_host):
                s.add(Guest(host_id=h.id, uuid=str(uuid.uuid4()), name=f"{h.name}-vm{i:02d}"))
    rows = _Rows(factory)
    for j in range(jobs):
        at = now - timedelta(days=shape.days) + j * step
        hosts = [shape.host(j * shape.job_hosts + k) for k in range(shape.job_hosts)]
        with unit_of_work(factory) as s:
            job = Job(
                state="succeeded",
                runbook="sleep",
                params={"seconds": "2"},
                host_names=hosts,
                pause_budget_seconds=30.0,
                created_by="nightly",
                created_at=at,
                started_at=at,
                finished_at=at + timedelta(minutes=2),
            )
            s.add(job)
            s.flush()
            job_id = job.id
        _event(rows, at, "job_created", job_id, actor="nightly", message=f"job {job_id}")
        _event(rows, at, "job_running", job_id, previous="scheduled")
        half = max(1, len(hosts) // 2)
        for wave, members in enumerate((hosts[:half], hosts[half:])):
            if not members:
                continue
            t = at + timedelta(seconds=30 * wave)
            _event(rows, t, "wave_started", job_id, wave=wave, hosts=members)
            for host in members:
                _host_cycle(rows, shape, job_id, host, wave, t, rnd)
            _event(rows, t + timedelta(seconds=5), "wave_finished", job_id, wave=wave)
        end = at + timedelta(minutes=2)
        _event(rows, end, "job_succeeded", job_id, previous="running", reason=None)
        for kind in ("job.created", "job.running", "job.succeeded"):
            _event(rows, end, "webhook_delivered", None, actor="webhooks", type=kind, status=204)
        while rows.events < events * (j + 1) // jobs and rows.events < events:
            _event(rows, end, "host_updated", None, actor="admin")  # tops up to --events
    rows.flush()
    with unit_of_work(factory, read_only=True) as s:
        counted = {
            "events": s.scalar(select(func.count()).select_from(Event)),
            "jobs": s.scalar(select(func.count()).select_from(Job)),
            "job_guests": s.scalar(select(func.count()).select_from(JobGuest)),
            "pause_intents": s.scalar(select(func.count()).select_from(PauseIntent)),
            "build_seconds": round(time.monotonic() - started, 1),
        }
    factory.kw["bind"].dispose()
    return counted


# --- the service -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, url: str, shape: Shape, port: int) -> Path:
    hosts = "".join(
        f'[[hosts]]\nname = "{shape.host(n)}"\nuri = "test:///default"\n'
        f"update_domain = {n // 10}\nsync_clock = false\n"
        for n in range(shape.fleet_hosts)
    )
    path = directory / "maintctl.toml"
    path.write_text(
        f'[server]\nbind = "127.0.0.1:{port}"\n'
        f'[database]\nurl = "{url}"\njournal_path = "{directory / "journal"}"\n'
        "retention_days = 0\n"
        '[runbooks.sleep]\nargv = ["sleep", "{seconds}"]\ntimeout_seconds = 20\n'
        '[runbooks.sleep.params]\nseconds = "^[0-9]{1,2}$"\n' + hosts
    )
    return path


@contextlib.contextmanager
def serving(config: Path, port: int) -> Iterator[str]:
    env = dict(os.environ, MAINTCTL_CONFIG=str(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--no-migrate", "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"the service did not start:\n{err[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Timings:
    ms: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, float]:
        values = sorted(self.ms[name])
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        return {
            "median": round(statistics.median(values), 1),
            "p95": round(p95, 1),
            "max": round(values[-1], 1),
        }


def measure(base: str, token: str, job_id: int, requests: int) -> Timings:
    paths = {
        "/api/v1/dashboard": "/api/v1/dashboard",
        "/dashboard": "/dashboard",
        "/api/v1/jobs": "/api/v1/jobs",
        "job events": f"/api/v1/jobs/{job_id}/events",
        "/metrics": "/metrics",
    }
    out = Timings({name: [] for name in paths})
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for round_ in range(3 + requests):
            for name, path in paths.items():
                started = time.perf_counter()
                r = client.get(path)
                took = (time.perf_counter() - started) * 1000
                if r.status_code != 200:
                    raise SystemExit(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
                if round_ >= 3:
                    out.ms[name].append(took)
                out.sizes[name] = len(r.content)
    return out


# --- the prune ---------------------------------------------------------------------------------


def measure_prune(url: str, days: float) -> dict[str, Any]:
    """Prune everything older than `days` while a writer commits an event every 20 ms."""
    factory = make_session_factory(make_engine(url))
    waits: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.wait(0.02):
            started = time.perf_counter()
            with unit_of_work(factory) as s:
                record_event(s, "guest_resumed", "a cycle's record", actor="bench")
            waits.append((time.perf_counter() - started) * 1000)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        done = prune(session_factory=factory, cutoff=utcnow() - timedelta(days=days))
    finally:
        stop.set()
        thread.join()
    factory.kw["bind"].dispose()
    return {
        "rows": done.rows,
        "batch_size": BATCH_SIZE,
        "transactions": done.batches,
        "longest_transaction_ms": round(done.longest_batch_seconds * 1000, 1),
        "seconds": round(done.seconds, 1),
        "writer_commits": len(waits),
        "writer_wait_max_ms": round(max(waits), 1) if waits else None,
        "writer_wait_median_ms": round(statistics.median(waits), 1) if waits else None,
    }


# --- main --------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--fleet-hosts", type=int, default=100)
    p.add_argument("--guests-per-host", type=int, default=10)
    p.add_argument("--job-hosts", type=int, default=10, help="hosts per nightly job")
    p.add_argument("--days", type=float, default=360.0, help="the history's span")
    p.add_argument("--runs", type=int, default=3, help="service starts, each measured anew")
    p.add_argument("--requests", type=int, default=20, help="per endpoint and run")
    p.add_argument("--prune-days", type=float, default=180.0, help="0: no prune")
    p.add_argument("--database-url", help="a PostgreSQL server (a scratch database is used)")
    p.add_argument("--json", type=Path, help="write every figure here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    shape = Shape(args.fleet_hosts, args.guests_per_host, args.job_hosts, args.days)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "runs": []}
    with (
        tempfile.TemporaryDirectory(prefix="maintctl-history-") as tmp,
        scratch_database(args.database_url, Path(tmp)) as url,
    ):
        upgrade(url)
        report["database"] = url.split(":", 1)[0]
        report["history"] = build_history(url, events=args.events, shape=shape)
        print(f"history: {json.dumps(report['history'])}", flush=True)
        factory = make_session_factory(make_engine(url))
        with unit_of_work(factory) as s:
            _, token = create_token(s, name="bench", role=Role.VIEWER, actor="bench")
            job_id = int(s.scalar(select(func.max(Job.id))) or 0)
        factory.kw["bind"].dispose()
        port = _free_port()
        config = write_config(Path(tmp), url, shape, port)
        worst = {name: 0.0 for name in ENDPOINTS}
        for run in range(1, args.runs + 1):
            with serving(config, port) as base:
                timings = measure(base, token, job_id, args.requests)
            rows = {name: timings.row(name) for name in ENDPOINTS}
            report["runs"].append({"rows": rows, "bytes": timings.sizes})
            for name, row in rows.items():
                worst[name] = max(worst[name], row["max"])
                print(
                    f"run {run} {name:18} median {row['median']:7.1f} ms  p95 {row['p95']:7.1f} "
                    f"ms  max {row['max']:7.1f} ms  ({timings.sizes[name]} bytes)",
                    flush=True,
                )
        report["worst_max_ms"] = worst
        met = all(v <= GOAL_MS for v in worst.values())
        print(f"every answer within {GOAL_MS:.0f} ms in every run: {'yes' if met else 'no'}")
        if args.prune_days > 0:
            report["prune"] = measure_prune(url, args.prune_days)
            print(f"prune: {json.dumps(report['prune'])}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
