"""Prometheus metrics, read from what the service records: never a second bookkeeping.

Gauges are read at scrape time from the database (unresolved pause intents, guests over their
budget, guests of recent jobs left resume_pending or flagged), from a libvirt ping of each host,
from the leader election, from the outbox (records waiting, records journaled because the
database is away) and from the process itself (prometheus_client's process collector, threads),
so they are right from the first scrape after a restart. A scrape while the database is away
still answers: maintctl_database_up is 0 and the series read from the database are left out
(deploy/prometheus/maintctl-alerts.yml alerts on the journal instead). Counters and histograms are the recorded events since this process started, read
from the event log at scrape time (controller.services.event_tail): a restart starts them at
zero, which Prometheus' rate() and increase() expect. Every replica reads the same event log,
so with several replicas aggregate the counters with max(), not sum().

The HTTP request histogram is the one series fed directly, by the API's middleware.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from controller.cycle.outbox import Outbox
from controller.decisions.states import TERMINAL
from controller.hosts.host_pings import HostPings
from controller.services.event_tail import EventRecord, EventTail, latest_event_id
from controller.store.db import is_database_outage, unit_of_work
from controller.store.models import Guest, Host, Job, JobGuest, PauseIntent, utcnow

PING_TIMEOUT_SECONDS = 3.0
PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 25, 30, 45, 60, 120)
SKEW_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Why the metadata listener refused (api/guest_listener.py); alert rules name these.
METADATA_REFUSALS = ("rate", "size", "connections", "timeout", "bad_request")

JOB_OUTCOMES = sorted(s.value for s in TERMINAL)
_JOB_FINISHED = {f"job_{outcome}": outcome for outcome in JOB_OUTCOMES}
_CLOCK_KINDS = ("clock_synced", "clock_sync_failed")
KINDS = frozenset(
    {*_JOB_FINISHED, *_CLOCK_KINDS, "guest_resumed", "guest_recovered", "budget_exceeded"}
)
# Guests that need a person, counted among the jobs running or ended within this many hours.
ATTENTION_STATUSES = ("resume_pending", "flagged")
ATTENTION_HOURS = 24


@dataclass(frozen=True)
class _Stored:
    """What the gauges read from the database in one scrape."""

    paused: int
    over_budget: int
    attention: dict[str, int]
    hosts: list[tuple[str, str]]
    stale: dict[str, int]  # by host: guests whose QEMU runs a deleted binary or library


def _read_stored(s: Session) -> _Stored:
    now = utcnow()
    open_intents = s.execute(
        select(PauseIntent.created_at, Job.pause_budget_seconds)
        .join(Job, Job.id == PauseIntent.job_id)
        .where(PauseIntent.resolved_at.is_(None))
    ).all()
    over = sum(1 for at, budget in open_intents if (now - at).total_seconds() > budget)
    recent = select(Job.id).where(
        Job.finished_at.is_(None) | (Job.finished_at >= now - timedelta(hours=ATTENTION_HOURS))
    )
    attention = dict.fromkeys(ATTENTION_STATUSES, 0)
    for status, count in s.execute(
        select(JobGuest.status, func.count())
        .where(JobGuest.status.in_(ATTENTION_STATUSES), JobGuest.job_id.in_(recent))
        .group_by(JobGuest.status)
    ):
        attention[str(status)] = int(count)
    hosts = [(h.name, h.uri) for h in s.scalars(select(Host).order_by(Host.name))]
    stale = dict.fromkeys((name for name, _ in hosts), 0)
    for name, count in s.execute(
        select(Host.name, func.count())
        .join(Guest, Guest.host_id == Host.id)
        .where(Guest.qemu_stale.is_(True))
        .group_by(Host.name)
    ):
        stale[str(name)] = int(count)
    return _Stored(len(open_intents), over, attention, hosts, stale)


class _StateCollector(Collector):
    """The gauges, read when Prometheus scrapes."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        host_pings: HostPings,
        is_leader: Callable[[], bool],
        outbox: Outbox | None,
    ) -> None:
        self._session_factory, self._pings, self._is_leader = session_factory, host_pings, is_leader
        self._outbox = outbox

    def collect(self) -> Iterable[Metric]:
        stored: _Stored | None = None
        try:
            with unit_of_work(self._session_factory, read_only=True) as s:
                stored = _read_stored(s)
        except Exception as exc:
            if not is_database_outage(exc):
                raise
        yield GaugeMetricFamily(
            "maintctl_database_up",
            "Whether this scrape could read the database (1) or not (0).",
            value=0 if stored is None else 1,
        )
        yield GaugeMetricFamily(
            "maintctl_leader",
            "Whether this replica leads (runs the timers, the sweep and takeovers).",
            value=1 if self._is_leader() else 0,
        )
        yield GaugeMetricFamily(
            "maintctl_process_threads", "Threads of this process.", value=threading.active_count()
        )
        if self._outbox is not None:
            yield GaugeMetricFamily(
                "maintctl_outbox_backlog_batches",
                "Batches of records (a cycle's) waiting to be written to the database.",
                value=self._outbox.backlog(),
            )
            yield GaugeMetricFamily(
                "maintctl_outbox_journaled_batches",
                "Batches of records held in the local journal because the database is away.",
                value=self._outbox.journaled(),
            )
        if stored is not None:
            yield from self._stored(stored)

    def _stored(self, stored: _Stored) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "maintctl_guests_paused",
            "Guests paused by maintctl now (pause intents not yet resolved).",
            value=stored.paused,
        )
        yield GaugeMetricFamily(
            "maintctl_guests_over_budget",
            "Guests paused now for longer than their job's pause budget.",
            value=stored.over_budget,
        )
        attention = GaugeMetricFamily(
            "maintctl_job_guests",
            f"Guests of the jobs running or ended in the last {ATTENTION_HOURS} h left "
            "resume_pending (resume not confirmed) or flagged (left as found), by status.",
            labels=["status"],
        )
        for status, count in stored.attention.items():
            attention.add_metric([status], count)
        yield attention
        reachable = GaugeMetricFamily(
            "maintctl_host_reachable",
            "Whether the host's libvirt answers a ping (1) or not (0).",
            labels=["host"],
        )
        pings = self._pings.ping_all(stored.hosts, timeout=PING_TIMEOUT_SECONDS)
        for name, status in pings.items():
            reachable.add_metric([name], 1 if status == "ok" else 0)
        yield reachable
        stale = GaugeMetricFamily(
            "maintctl_guests_qemu_stale",
            "Guests whose QEMU process runs a deleted binary or library (an update does not "
            "reach them until the process is refreshed), as last read at a job's preflight.",
            labels=["host"],
        )
        for name, count in stored.stale.items():
            stale.add_metric([name], count)
        yield stale


class ServiceMetrics:
    """The registry /metrics renders; its counters follow the event log from process start."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        host_pings: HostPings,
        is_leader: Callable[[], bool],
        outbox: Outbox | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._lock = threading.Lock()
        self._tail: EventTail | None = None  # opened at the first scrape or by start()
        # No *_created series: they double the exposition and nothing here needs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = (
            CollectorRegistry()
        )  # no collect() at registration: no database before start
        r = self.registry
        self.pause = Histogram(
            "maintctl_guest_pause_seconds",
            "How long each guest was paused, from its suspend to its resume.",
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.skew = Histogram(
            "maintctl_guest_clock_skew_seconds",
            "Absolute clock skew of each guest measured after its clock sync.",
            buckets=SKEW_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "maintctl_jobs", "Jobs that ended, by outcome.", ["outcome"], registry=r
        )
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome)
        self.budget_exceeded = Counter(
            "maintctl_budget_exceeded",
            "Host cycles whose guests stayed paused past the pause budget.",
            registry=r,
        )
        self.recovered = Counter(
            "maintctl_guests_recovered",
            "Guests settled by reconciliation after their job's runner was lost.",
            registry=r,
        )
        self.guardian_resumes = Counter(
            "maintctl_guardian_resumes",
            "Guests the guardian resumed because the controller could not (a rescue).",
            registry=r,
        )
        self.http = Histogram(
            "maintctl_http_request_duration_seconds",
            "HTTP request duration by method, route template and status.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        # Counted by the metadata listener's own process and handed over by `maintctl serve`.
        self.metadata_refused = Counter(
            "maintctl_metadata_refused",
            "Requests and connections the guests' metadata listener refused, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in METADATA_REFUSALS:
            self.metadata_refused.labels(reason)
        self._over_budget: set[tuple[int | None, str | None]] = set()
        r.register(_StateCollector(session_factory, host_pings, is_leader, outbox))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, ...

    def start(self) -> None:
        """Count from here: events recorded before this process started are not counted."""
        with self._lock:
            if self._tail is None:
                with unit_of_work(self._session_factory, read_only=True) as s:
                    self._tail = EventTail(after=latest_event_id(s), kinds=KINDS)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http.labels(method, route, str(status)).observe(seconds)

    def count_metadata_refusals(self, reason: str, count: int) -> None:
        if reason in METADATA_REFUSALS and count > 0:
            self.metadata_refused.labels(reason).inc(count)

    def render(self) -> bytes:
        """The exposition in Prometheus' text format, after reading the newest events (while the
        database is away, the counters stay where they were and the gauges say so)."""
        try:
            self._read_events()
        except Exception as exc:
            if not is_database_outage(exc):
                raise
        return generate_latest(self.registry)

    def _read_events(self) -> None:
        self.start()
        with self._lock:
            assert self._tail is not None
            while True:
                with unit_of_work(self._session_factory, read_only=True) as s:
                    events = self._tail.read(s, limit=5000)
                for e in events:
                    self._count(e)
                if len(events) < 5000:
                    break

    def _count(self, e: EventRecord) -> None:
        d: dict[str, Any] = e.details or {}
        if e.kind in _JOB_FINISHED:
            self.jobs.labels(_JOB_FINISHED[e.kind]).inc()
        elif e.kind == "budget_exceeded":
            # The runbook's watchdog and the verdict may both record it for one host cycle.
            key = (e.job_id, e.host)
            if key not in self._over_budget:
                self._over_budget.add(key)
                self.budget_exceeded.inc()
        if e.kind in ("guest_resumed", "guest_recovered") and d.get("pause_ms") is not None:
            self.pause.observe(float(d["pause_ms"]) / 1000)
        if e.kind == "guest_recovered":
            self.recovered.inc()
        if e.kind == "guest_resumed" and d.get("by_guardian"):
            self.guardian_resumes.inc()
        if e.kind in (*_CLOCK_KINDS, "guest_recovered") and d.get("skew_ms") is not None:
            self.skew.observe(abs(float(d["skew_ms"])) / 1000)
