"""The reads bench.history times over a million events, on a small history: every statement they
send to the big tables (events, job_guests, pause_intents, job_hosts) is served by an index.
On PostgreSQL with sequential scans disabled, a plan that still scans a whole table has no index
to use; on SQLite a plain `SCAN table` is a whole-table read unless it walks the ids for a LIMIT."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from sqlalchemy import event

from bench.history import Shape, build_history
from controller.hosts.host_pings import HostPings
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services import jobs as job_service
from controller.services.dashboard import read_dashboard
from controller.services.metrics import ServiceMetrics
from controller.services.retention import prune
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.models import utcnow

BIG = ("events", "job_guests", "pause_intents", "job_hosts")


def captured_reads(url: str) -> list[tuple[str, Any]]:
    factory = make_session_factory(make_engine(url))
    engine = factory.kw["bind"]
    seen: list[tuple[str, Any]] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and any(t in statement for t in BIG):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", note)
    pings = HostPings(HypervisorPool(LibvirtHost))  # the history's hosts are test:///default
    metrics = ServiceMetrics(session_factory=factory, host_pings=pings, is_leader=lambda: True)
    try:
        with unit_of_work(factory, read_only=True) as s:
            read_dashboard(s, pause_budget_seconds=30.0, unreachable=())
            for host in (None, "hv0003"):
                page = job_service.list_jobs(s, state=None, host=host, limit=50, cursor=None)
                job_service.with_outcomes(s, page.items)
            job_service.job_events(s, page.items[0].id)
        metrics.render()
        prune(session_factory=factory, cutoff=utcnow() - timedelta(days=180), dry_run=True)
        prune(session_factory=factory, cutoff=utcnow() - timedelta(days=180), pause_seconds=0)
    finally:
        pings.close()
        event.remove(engine, "before_cursor_execute", note)
    engine.dispose()
    return seen


def plans(url: str, reads: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    engine = make_engine(url)
    raw: Any = engine.raw_connection()
    out = []
    try:
        cur = raw.cursor()
        postgres = engine.dialect.name == "postgresql"
        if postgres:
            cur.execute("SET enable_seqscan = off")
        for statement, parameters in reads:
            prefix = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
            cur.execute(prefix + statement, parameters)
            out.append(
                (
                    statement,
                    "\n".join(str(row[-1] if not postgres else row[0]) for row in cur.fetchall()),
                )
            )
    finally:
        raw.close()
        engine.dispose()
    return out


def whole_table_reads(statement: str, plan: str, postgres: bool) -> list[str]:
    found = []
    for table in BIG:
        if postgres and re.search(rf"Seq Scan on {table}\b", plan):
            found.append(table)
        walks_ids = re.search(rf"ORDER BY {table}\.id( DESC)?\s+LIMIT", statement)
        if not postgres and re.search(rf"^SCAN {table}$", plan, re.M) and not walks_ids:
            found.append(table)
    return found


def test_the_timed_reads_and_the_prune_use_indexes(db_url):
    upgrade(db_url)
    build_history(db_url, events=6000, shape=Shape(20, 4, 5, 360))
    reads = captured_reads(db_url)
    assert len(reads) >= 15
    postgres = db_url.startswith("postgresql")
    bad = [
        (tables, statement, plan)
        for statement, plan in plans(db_url, reads)
        if (tables := whole_table_reads(statement, plan, postgres))
    ]
    assert bad == [], "\n\n".join(f"{t}\n{s}\n{p}" for t, s, p in bad)


def test_a_listed_job_is_the_same_document_as_the_job_read_alone(sqlite_url):
    """GET /api/v1/jobs builds its documents from rows; GET /api/v1/jobs/{id} from the job."""
    from api.routes.jobs import job_listed, job_public
    from controller.store.models import Job, JobHost

    upgrade(sqlite_url)
    build_history(sqlite_url, events=3000, shape=Shape(20, 4, 5, 30))
    factory = make_session_factory(make_engine(sqlite_url))
    with unit_of_work(factory) as s:  # one running, in its second wave, with a window
        job = Job(state="running", runbook="sleep", pause_budget_seconds=9.0, window="nightly")
        s.add(job)
        s.flush()
        for n, (wave, state) in enumerate([(0, "done"), (1, "running"), (2, "pending")]):
            s.add(JobHost(job_id=job.id, host=f"hv{n:04d}", wave=wave, state=state, position=n))
    with unit_of_work(factory, read_only=True) as s:
        page = job_service.list_jobs(s, state=None, host=None, limit=200, cursor=None)
        listed = [job_listed(x) for x in job_service.with_outcomes(s, page.items)]
        alone = [job_public(j) for j in page.items]
    assert len(listed) > 5 and listed[0].current_wave == 1 and listed[1].guests
    assert [x.model_dump() for x in listed] == [x.model_dump() for x in alone]
