"""Fleet benchmark: one rollout over N simulated hosts through the real engine, in one process.

    python -m bench.fleet --hosts 100 --guests-per-host 10 --domains 10

Each host is libvirt's test driver reading a node XML file of its own
(test:///<tmp>/hostNNNN.xml, G running guests). Every libvirt.open() of such a URI gets its own
in-memory state, and maintctl keeps one connection per host URI, so the engine sees N separate
hosts without a daemon. Hosts go into D update domains in contiguous blocks (host i, counted
from 0, is in domain i * D // N: hosts 0-9 in domain 0 for 100 hosts in 10 domains), like racks.
The job is the real thing: a no-op runbook (`true`), `hosts: "all"`, submitted through the job
service and run by MaintenanceScheduler.start_now, as the integration tests do, on SQLite in a
temporary directory (or a scratch PostgreSQL database, --database-url).

Figures, read from what the engine recorded (the job, its work items, its events) unless said:
  rollout    job started_at -> finished_at
  wave       from the wave's first item claim or wave_started event, whichever is earlier, to
             its wave_finished event
  cycle      one host's work item, started_at (claim) -> finished_at
  overhead   wave time minus the slowest host cycle of that wave (median and max over waves):
             what the controller adds around the hosts; with hosts run one after another it
             also holds every host but the slowest
  gate       wave_finished -> gate_passed (the health gate between update domains)
  RSS        this process's VmRSS sampled every 50 ms (and ru_maxrss, the kernel's peak)
  connections  libvirt connections open at once, counted by a wrapper around libvirt.open and
             virConnect.close that the bench installs (exact, not sampled)
Correctness: the job must succeed and every guest of every host must be running, read through
the very connections the engine opened (a fresh open would see fresh state); else exit 1.

--runs K runs K times, each in a fresh process (so one run's memory does not inflate the next
one's RSS), and adds a row with the range (min-max) of each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt
import psycopg
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url

from controller.cycle.runtime import Runtime
from controller.daemon.scheduler import MaintenanceScheduler
from controller.decisions.rollout import RolloutPolicy
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services import jobs
from controller.services.inventory import sync_config_hosts
from controller.settings import DatabaseSettings, HostConfig, RunbookConfig, Settings
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.models import Event, Job, JobGuest, JobHost

RUNBOOK = "noop"
SAMPLE_SECONDS = 0.05
ABORT_GRACE_SECONDS = 60.0
GOOD_STATES = ("succeeded", "succeeded_with_warnings")


# --- the simulated fleet -------------------------------------------------------------------------

DOMAIN_XML = (
    "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
    "<memory>65536</memory><os><type>hvm</type></os></domain>"
)


@dataclass(frozen=True)
class SimHost:
    name: str
    uri: str
    update_domain: int
    guests: list[str]


def write_fleet(directory: Path, *, hosts: int, guests: int, domains: int) -> list[SimHost]:
    """One node XML file per host, each with `guests` running test-driver domains."""
    fleet = []
    for i in range(hosts):
        name = f"host{i:04d}"
        names = [f"{name}-g{j:02d}" for j in range(guests)]
        body = "\n".join(
            DOMAIN_XML.format(name=g, uuid=uuid.uuid5(uuid.NAMESPACE_DNS, f"{g}.bench"))
            for g in names
        )
        path = directory / f"{name}.xml"
        path.write_text(f"<node>\n{body}\n</node>\n")
        fleet.append(SimHost(name, f"test://{path}", i * domains // hosts, names))
    return fleet


# --- what the bench watches while the job runs ---------------------------------------------------


class ConnectionCounter:
    """Counts libvirt connections open at once: wraps libvirt.open and virConnect.close.

    LibvirtHost calls libvirt.open through the module, so the wrapper sees every connection the
    engine opens; a connection that is never closed but collected is counted closed then. The
    last connection opened per URI is kept, to read the guests through the engine's own state.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[int] = set()
        self.opened = 0
        self.peak = 0
        self.by_uri: dict[str, libvirt.virConnect] = {}

    @property
    def now_open(self) -> int:
        with self._lock:
            return len(self._open)

    def _closed(self, key: int) -> None:
        with self._lock:
            self._open.discard(key)

    @contextlib.contextmanager
    def installed(self) -> Iterator[ConnectionCounter]:
        real_open, real_close = libvirt.open, libvirt.virConnect.close
        counter = self

        def counted_open(name: str | None = None) -> libvirt.virConnect:
            conn = real_open(name)
            key = id(conn)
            with counter._lock:
                counter._open.add(key)
                counter.opened += 1
                counter.peak = max(counter.peak, len(counter._open))
                if name is not None:
                    counter.by_uri[name] = conn
            # libvirt-python closes a connection that is collected unclosed: count that too.
            weakref.finalize(conn, counter._closed, key)
            return conn

        def counted_close(conn: libvirt.virConnect) -> int:
            counter._closed(id(conn))
            result: int = real_close(conn)
            return result

        libvirt.open = counted_open
        libvirt.virConnect.close = counted_close
        try:
            yield self
        finally:
            libvirt.open = real_open
            libvirt.virConnect.close = real_close


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler:
    """Samples this process's resident memory and thread count every 50 ms in a thread."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        self.peak_rss_kib = max(self.peak_rss_kib, rss_kib())
        self.peak_threads = max(self.peak_threads, threading.active_count())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class SqlCounter:
    """Counts the engine's SQL statements and commits by thread name, through SQLAlchemy's
    public events on the context's database engine."""

    def __init__(self, ctx: Runtime) -> None:
        self.engine = ctx.session_factory.kw["bind"]
        self.statements: Counter[str] = Counter()
        self.commits: Counter[str] = Counter()

    @staticmethod
    def _thread() -> str:
        return threading.current_thread().name.split("_")[0]  # "guest-op_3" -> "guest-op"

    def _statement(self, *_: Any) -> None:
        self.statements[self._thread()] += 1

    def _commit(self, *_: Any) -> None:
        self.commits[self._thread()] += 1

    def __enter__(self) -> SqlCounter:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)

    @staticmethod
    def per_host(counts: Counter[str], hosts: int) -> dict[str, float]:
        total = {"all": sum(counts.values())} | dict(counts.most_common())
        return {name: round(n / hosts, 2) for name, n in total.items()}


# --- the database ------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(url: str | None, directory: Path) -> Iterator[str]:
    """SQLite in `directory` by default. For a PostgreSQL URL, a fresh database is created on
    that server with that login (it needs CREATEDB) and dropped afterwards: the bench declares
    its own hosts and never writes into a database someone else uses."""
    if url is None:
        yield f"sqlite:///{directory / 'fleet.db'}"
        return
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        yield url
        return
    name = f"maintctl_bench_{uuid.uuid4().hex[:12]}"

    def admin() -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=parsed.host,
            port=parsed.port or 5432,
            user=parsed.username,
            password=parsed.password,
            dbname=parsed.database,
            autocommit=True,
        )

    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_context(url: str, fleet: list[SimHost], journal: Path) -> Runtime:
    """An engine context as the service makes one, with the fleet declared as config hosts."""
    upgrade(url)
    settings = Settings(
        hosts=[
            HostConfig(name=h.name, uri=h.uri, update_domain=h.update_domain, sync_clock=False)
            for h in fleet
        ],
        database=DatabaseSettings(url=url, journal_path=journal),
        runbooks={RUNBOOK: RunbookConfig(argv=["true"], timeout_seconds=5)},
        # The fleet is libvirt's test driver: allowed here, for the benchmark only. (A dict, so
        # that MAINTCTL_MAINTENANCE_* variables are merged into it rather than replacing it.)
        maintenance={"allow_test_driver": True},  # type: ignore[arg-type]
    )
    factory = make_session_factory(make_engine(url))
    with unit_of_work(factory) as s:
        sync_config_hosts(s, settings)
    timeout = settings.maintenance.libvirt_call_timeout_seconds
    return Runtime(
        settings=settings,
        session_factory=factory,
        hypervisors=HypervisorPool(lambda uri: LibvirtHost(uri, call_timeout=timeout)),
    )


# --- the rollout ---------------------------------------------------------------------------------


def rollout_policy(max_parallel_hosts: int | None) -> RolloutPolicy:
    """The job's rollout; --max-parallel-hosts only where this engine knows the option."""
    if max_parallel_hosts is None:
        return RolloutPolicy()
    known = {f.name for f in dataclasses.fields(RolloutPolicy)}
    if "max_parallel_hosts" not in known:
        raise SystemExit(
            "--max-parallel-hosts: this engine has no rollout.max_parallel_hosts yet "
            "(the hosts of a wave run one after another)"
        )
    return RolloutPolicy(max_parallel_hosts=max_parallel_hosts)  # type: ignore[call-arg]


@dataclass
class Run:
    job_id: int
    wall_s: float
    timed_out: bool
    error: str | None = None


def run_rollout(ctx: Runtime, policy: RolloutPolicy, timeout: float) -> Run:
    """Submit one job over every host and run it to its end; abort it at `timeout`."""
    with unit_of_work(ctx.session_factory) as s:
        job_id = jobs.submit(
            s,
            ctx.settings,
            # No notice: the benchmark measures the rollout, not the guests' 15 minutes.
            jobs.JobRequest(
                hosts=[], all_hosts=True, runbook=RUNBOOK, rollout=policy, notice_seconds=0
            ),
            actor="bench",
        ).id
    errors: list[str] = []

    def target() -> None:
        try:
            MaintenanceScheduler(ctx).start_now(job_id)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    runner = threading.Thread(target=target, name="bench-job", daemon=True)
    runner.start()
    runner.join(timeout)
    timed_out = runner.is_alive()
    if timed_out:
        ctx.active.abort(job_id)  # ends after the host in hand; its guests are resumed
        runner.join(ABORT_GRACE_SECONDS)
    return Run(job_id, time.monotonic() - started, timed_out, errors[0] if errors else None)


# --- figures, from what the engine recorded ------------------------------------------------------


def _s(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


PHASES = [
    ("claim_to_preflight", "claim -> preflight_done (drain, list guests, preflight tx)"),
    ("preflight_to_intents", "preflight_done -> pausing (intents tx)"),
    ("intents_to_first_pause", "pausing -> first suspend"),
    ("pauses_and_spawn", "first suspend -> runbook_started"),
    ("runbook", "runbook_started -> runbook_finished"),
    ("resumes", "runbook_finished -> last resumed"),
    ("sync_records", "last resumed -> last clock_synced"),
    ("to_item_end", "last clock_synced -> item finished"),
    ("to_next_claim", "item finished -> next host's claim (same wave)"),
]


@dataclass
class Figures:
    hosts: int
    guests_per_host: int
    domains: int
    max_parallel_hosts: int | None
    database: str
    state: str = "?"
    guests_running: int = 0
    guests_total: int = 0
    rollout_s: float | None = None
    wall_s: float | None = None
    waves: int = 0
    wave_s_median: float | None = None
    wave_s_max: float | None = None
    slowest_cycle_s_median: float | None = None
    cycle_s_median: float | None = None
    overhead_s_median: float | None = None
    overhead_s_max: float | None = None
    gate_s_median: float | None = None
    # CPU time of this process (user + system, every thread) while the job ran: with one
    # interpreter lock, a floor for the rollout time whatever runs in parallel.
    cpu_s: float | None = None
    rss_base_mb: float | None = None
    rss_peak_mb: float | None = None
    maxrss_mb: float | None = None
    connections_peak: int = 0
    connections_open_at_end: int = 0
    connections_opened: int = 0
    # SQL statements and commits per host while the job ran, by thread ("outbox-writer", ...).
    sql_per_host: dict[str, float] = field(default_factory=dict)
    commits_per_host: dict[str, float] = field(default_factory=dict)
    threads_peak: int = 0
    events: int = 0
    events_per_guest: float | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    # Per wave, in order: [hosts, wave s, slowest host cycle s, median host cycle s, gate s].
    per_wave: list[list[float | None]] = field(default_factory=list)
    # The machine's 1-minute load average when the job ended (this run's own share included).
    load_1min: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


STEP_KINDS = ("preflight_done", "pausing", "runbook_started", "runbook_finished", "clock_synced")
WAVE_KINDS = ("wave_started", "wave_finished", "gate_passed")


def read_figures(ctx: Runtime, job_id: int, f: Figures) -> None:
    """The figures from the job's rows: columns only, so that reading 40,000 events does not
    itself become the peak of the process's memory (ru_maxrss)."""
    with unit_of_work(ctx.session_factory) as s:
        job = s.get_one(Job, job_id)
        items = s.execute(
            select(JobHost.host, JobHost.wave, JobHost.started_at, JobHost.finished_at).where(
                JobHost.job_id == job_id
            )
        ).all()
        f.events = s.scalar(select(func.count(Event.id)).where(Event.job_id == job_id)) or 0
        steps = s.execute(
            select(Event.host, Event.kind, Event.at)
            .where(Event.job_id == job_id, Event.kind.in_(STEP_KINDS))
            .order_by(Event.id)
        ).all()
        waves = s.execute(
            select(Event.kind, Event.at, Event.details).where(
                Event.job_id == job_id, Event.kind.in_(WAVE_KINDS)
            )
        ).all()
        guests = s.execute(
            select(JobGuest.host, JobGuest.status, JobGuest.paused_at, JobGuest.resumed_at).where(
                JobGuest.job_id == job_id
            )
        ).all()
    f.state = job.state
    if job.state not in GOOD_STATES:
        f.problems.append(f"job {job_id} ended {job.state} ({job.reason}): {job.detail}")
    if job.started_at and job.finished_at:
        f.rollout_s = _s(job.started_at, job.finished_at)
    f.events_per_guest = f.events / max(1, f.guests_total)
    resumed = sum(1 for g in guests if g.status == "resumed")
    if resumed != f.guests_total:
        f.problems.append(f"{resumed} of {f.guests_total} guests recorded resumed")
    wave_figures(f, items, waves)
    f.phases_ms = phase_medians(items, steps, guests)


def wave_figures(f: Figures, items: Sequence[Any], events: Sequence[Any]) -> None:
    by_wave: dict[int, list[Any]] = defaultdict(list)
    for item in items:
        by_wave[item.wave].append(item)
    at = {(e.kind, e.details["wave"]): e.at for e in events}
    waves, slowest, overheads, cycles, gates = [], [], [], [], []
    for wave, members in sorted(by_wave.items()):
        done = [i for i in members if i.started_at and i.finished_at]
        spans = [_s(i.started_at, i.finished_at) for i in done]
        cycles += spans
        end = at.get(("wave_finished", wave))
        if end is None or not done:
            continue
        begin = min([at.get(("wave_started", wave), end)] + [i.started_at for i in done])
        waves.append(_s(begin, end))
        slowest.append(max(spans))
        overheads.append(_s(begin, end) - max(spans))
        gate = at.get(("gate_passed", wave))
        if gate is not None:
            gates.append(_s(end, gate))
        f.per_wave.append(
            [
                len(done),
                waves[-1],
                max(spans),
                statistics.median(spans),
                gates[-1] if gate else None,
            ]
        )
    f.waves = len(waves)
    if len(waves) != len(by_wave):
        f.problems.append(f"{len(waves)} of {len(by_wave)} waves finished")
    f.wave_s_median, f.wave_s_max = _median(waves), max(waves, default=None)
    f.slowest_cycle_s_median, f.cycle_s_median = _median(slowest), _median(cycles)
    f.overhead_s_median, f.overhead_s_max = _median(overheads), max(overheads, default=None)
    f.gate_s_median = _median(gates)


def phase_medians(
    items: Sequence[Any], events: Sequence[Any], guests: Sequence[Any]
) -> dict[str, float]:
    """Median of each step of a host's cycle over the hosts, in ms, from the recorded times."""
    first: dict[tuple[str | None, str], datetime] = {}
    last: dict[tuple[str | None, str], datetime] = {}
    for e in events:
        first.setdefault((e.host, e.kind), e.at)
        last[(e.host, e.kind)] = e.at
    paused: dict[str, list[datetime]] = defaultdict(list)
    resumed: dict[str, list[datetime]] = defaultdict(list)
    for g in guests:
        if g.paused_at is not None:
            paused[g.host].append(g.paused_at)
        if g.resumed_at is not None:
            resumed[g.host].append(g.resumed_at)
    ordered = sorted(
        (i for i in items if i.started_at and i.finished_at), key=lambda i: i.started_at
    )
    steps: dict[str, list[float]] = defaultdict(list)
    for n, item in enumerate(ordered):
        h = item.host
        following = ordered[n + 1] if n + 1 < len(ordered) else None
        if following is not None and following.wave == item.wave:
            steps["to_next_claim"].append(_s(item.finished_at, following.started_at) * 1000)
        try:
            marks = [
                item.started_at,
                first[(h, "preflight_done")],
                first[(h, "pausing")],
                min(paused[h]),
                first[(h, "runbook_started")],
                first[(h, "runbook_finished")],
                max(resumed[h]),
                last[(h, "clock_synced")],
                item.finished_at,
            ]
        except (KeyError, ValueError):
            continue  # a host without guests, or one that did not get that far
        for (name, _), a, b in zip(PHASES, marks, marks[1:], strict=False):
            steps[name].append(_s(a, b) * 1000)
    return {name: round(statistics.median(v), 2) for name, v in steps.items() if v}


def count_running(counter: ConnectionCounter, fleet: list[SimHost]) -> tuple[int, list[str]]:
    """Guests running, read through the connections the engine itself opened."""
    running, problems = 0, []
    for host in fleet:
        conn = counter.by_uri.get(host.uri)
        if conn is None:
            problems.append(f"{host.name}: the engine never connected")
            continue
        try:
            states = {d.name(): d.state()[0] for d in conn.listAllDomains(0)}
        except libvirt.libvirtError as exc:
            problems.append(f"{host.name}: {exc}")
            continue
        up = [g for g in host.guests if states.get(g) == libvirt.VIR_DOMAIN_RUNNING]
        running += len(up)
        if len(up) != len(host.guests):
            problems.append(f"{host.name}: {len(host.guests) - len(up)} guest(s) not running")
    return running, problems


# --- one run ---------------------------------------------------------------------------------------


def run_once(args: argparse.Namespace) -> Figures:
    f = Figures(
        hosts=args.hosts,
        guests_per_host=args.guests_per_host,
        domains=args.domains,
        max_parallel_hosts=args.max_parallel_hosts,
        database="sqlite",
        guests_total=args.hosts * args.guests_per_host,
    )
    policy = rollout_policy(args.max_parallel_hosts)
    counter = ConnectionCounter()
    with (
        tempfile.TemporaryDirectory(prefix="maintctl-fleet-") as tmp,
        scratch_database(args.database_url, Path(tmp)) as url,
        counter.installed(),
    ):
        f.database = make_url(url).get_backend_name()
        fleet = write_fleet(
            Path(tmp), hosts=args.hosts, guests=args.guests_per_host, domains=args.domains
        )
        ctx = make_context(url, fleet, Path(tmp) / "fleet.journal")
        try:
            f.rss_base_mb = rss_kib() / 1024
            cpu_before = _cpu_s()
            with Sampler() as sampler, SqlCounter(ctx) as sql:
                run = run_rollout(ctx, policy, args.timeout)
            f.cpu_s = _cpu_s() - cpu_before
            f.load_1min = os.getloadavg()[0]
            f.sql_per_host = sql.per_host(sql.statements, args.hosts)
            f.commits_per_host = sql.per_host(sql.commits, args.hosts)
            f.wall_s = run.wall_s
            f.rss_peak_mb = sampler.peak_rss_kib / 1024
            f.threads_peak = sampler.peak_threads
            f.connections_peak, f.connections_opened = counter.peak, counter.opened
            if run.timed_out:
                f.problems.append(f"not done after --timeout {args.timeout:g} s: aborted")
            if run.error:
                f.problems.append(f"the job raised {run.error}")
            f.guests_running, problems = count_running(counter, fleet)
            f.problems += problems[:5] + (
                [f"... and {len(problems) - 5} more host(s)"] if len(problems) > 5 else []
            )
            read_figures(ctx, run.job_id, f)
        finally:
            ctx.close()
            ctx.session_factory.kw["bind"].dispose()
        counter.by_uri.clear()
        f.connections_open_at_end = counter.now_open  # after ctx.close(): should be 0
    f.maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f


# --- reporting -------------------------------------------------------------------------------------

COLUMNS: list[tuple[str, Callable[[Figures], Any]]] = [
    ("fleet", lambda f: f"{f.hosts}x{f.guests_per_host}, {f.domains} domains"),
    ("parallel", lambda f: f.max_parallel_hosts or "-"),
    ("db", lambda f: f.database),
    ("job", lambda f: f.state),
    ("guests running", lambda f: f"{f.guests_running}/{f.guests_total}"),
    ("rollout s", lambda f: f.rollout_s),
    ("wave s median", lambda f: f.wave_s_median),
    ("wave s max", lambda f: f.wave_s_max),
    ("slowest host cycle s (median over waves)", lambda f: f.slowest_cycle_s_median),
    ("host cycle s median", lambda f: f.cycle_s_median),
    ("overhead s median", lambda f: f.overhead_s_median),
    ("overhead s max", lambda f: f.overhead_s_max),
    ("gate s median", lambda f: f.gate_s_median),
    ("CPU s", lambda f: f.cpu_s),
    ("peak RSS MB", lambda f: f.rss_peak_mb),
    ("ru_maxrss MB", lambda f: f.maxrss_mb),
    ("RSS before job MB", lambda f: f.rss_base_mb),
    ("peak libvirt conns", lambda f: f.connections_peak),
    ("peak threads", lambda f: f.threads_peak),
    ("load avg", lambda f: f.load_1min),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _range(values: list[Any]) -> str:
    numbers = [v for v in values if isinstance(v, int | float)]
    if len(numbers) != len(values) or not numbers:
        distinct = sorted({_cell(v) for v in values})
        return distinct[0] if len(distinct) == 1 else " / ".join(distinct)
    lo, hi = min(numbers), max(numbers)
    return _cell(lo) if lo == hi else f"{_cell(lo)}-{_cell(hi)}"


def table(runs: list[Figures]) -> str:
    heads = ["run"] + [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for n, f in enumerate(runs, 1):
        lines.append("| " + " | ".join([str(n)] + [_cell(get(f)) for _, get in COLUMNS]) + " |")
    if len(runs) > 1:
        cells = [_range([get(f) for f in runs]) for _, get in COLUMNS]
        lines.append("| **range** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_table(runs: list[Figures]) -> str:
    heads = ["per host: each step's median over hosts (ms); SQL"] + [
        f"run {n}" for n in range(1, len(runs) + 1)
    ]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, says in PHASES:
        lines.append(
            "| " + " | ".join([says] + [_cell(f.phases_ms.get(name)) for f in runs]) + " |"
        )
    for what, get in (("SQL statements", _sql), ("commits", _commits)):
        lines.append("| " + " | ".join([f"{what} per host"] + [get(f) for f in runs]) + " |")
    return "\n".join(lines)


def _per_thread(counts: dict[str, float]) -> str:
    return ", ".join(f"{name} {n:g}" for name, n in counts.items() if n >= 0.5)


def _sql(f: Figures) -> str:
    return _per_thread(f.sql_per_host)


def _commits(f: Figures) -> str:
    return _per_thread(f.commits_per_host)


# --- entry points ----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--guests-per-host", type=int, default=10)
    parser.add_argument("--domains", type=int, default=10, help="update domains")
    parser.add_argument("--runs", type=int, default=1, help="each in a fresh process")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="abort a run after this many seconds"
    )
    parser.add_argument(
        "--max-parallel-hosts",
        type=int,
        default=None,
        help="rollout.max_parallel_hosts, if this engine has it (default: not passed)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL server to use (a scratch database is created and dropped per run); "
        "default SQLite in a temporary directory",
    )
    parser.add_argument("--phases", action="store_true", help="also print each step's median")
    parser.add_argument("--json", type=Path, help="write the figures of every run here")
    args = parser.parse_args(argv)
    if args.hosts < 1 or args.guests_per_host < 1 or not 1 <= args.domains <= args.hosts:
        parser.error("need hosts >= 1, guests-per-host >= 1 and 1 <= domains <= hosts")
    return args


def _in_fresh_process(argv: list[str], n: int, runs: int) -> Figures:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        print(f"run {n}/{runs} ...", file=sys.stderr)
        subprocess.run(  # its own table goes nowhere: this process prints them all
            [sys.executable, "-m", "bench.fleet", *argv, "--runs", "1", "--json", str(out)],
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
        )
        if not out.exists():
            raise SystemExit(f"run {n} wrote no figures")
        (data,) = json.loads(out.read_text())["runs"]
    data.pop("ok", None)
    return Figures(**data)


def bench(argv: list[str] | None = None) -> list[Figures]:
    """Run the benchmark as the command line asks; the figures of each run."""
    raw = sys.argv[1:] if argv is None else argv
    args = parse(raw)
    if args.runs > 1:
        child = _child_argv(raw)
        runs = [_in_fresh_process(child, n, args.runs) for n in range(1, args.runs + 1)]
    else:
        runs = [run_once(args)]
    if args.json:
        payload = {"runs": [dataclasses.asdict(f) | {"ok": f.ok} for f in runs]}
        args.json.write_text(json.dumps(payload, indent=2))
    return runs


def _child_argv(argv: list[str]) -> list[str]:
    """The command line without --runs, --json and --phases (the parent's business)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--runs", "--json"):
            skip = True
        elif a != "--phases" and not a.startswith(("--runs=", "--json=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raw = sys.argv[1:] if argv is None else argv
    runs = bench(raw)
    f = runs[0]
    print(
        f"\n{f.hosts} hosts x {f.guests_per_host} guests in {f.domains} update domains, "
        f"no-op runbook, {f.database}; times in s, memory in MB\n"
    )
    print(table(runs))
    if parse(raw).phases:
        print()
        print(phase_table(runs))
    for n, f in enumerate(runs, 1):
        for problem in f.problems:
            print(f"run {n}: {problem}", file=sys.stderr)
    return 0 if all(f.ok for f in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
