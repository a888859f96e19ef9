"""How the client commands print: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cli.options import Output

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)

STATE_STYLE = {
    "succeeded": "green",
    "done": "green",
    "resumed": "green",
    "succeeded_with_warnings": "yellow",
    "skipped": "yellow",
    "running": "cyan",
    "notifying": "cyan",
    "paused": "cyan",
    "failed": "red",
    "aborted": "red",
    "interrupted": "red",
    "expired": "red",
    "flagged": "red",
}


def state_text(state: str | None) -> Text:
    return Text(state or "-", style=STATE_STYLE.get(state or "", ""))


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def emit(data: Any, output: Output, table: RenderableType | None = None) -> None:
    if output is Output.JSON or table is None:
        typer.echo(json.dumps(data, indent=2))
    else:
        stdout.print(table)


def job_view(job: Mapping[str, Any]) -> RenderableType:
    reason = f" ({job['reason']})" if job.get("reason") else ""
    head = Text.assemble(
        (f"job {job['id']}: ", "bold"),
        state_text(job["state"]),
        reason,
        f"  runbook {job['runbook']} on {', '.join(job['hosts'])}",
    )
    parts: list[RenderableType] = [head]
    if job.get("detail"):
        parts.append(Text(job["detail"]))
    hosts = Table("host", "wave", "state", "outcome", "detail", title="hosts", title_justify="left")
    for item in job.get("items", []):
        hosts.add_row(
            item["host"],
            str(item["wave"]),
            state_text(item["state"]),
            item["outcome"] or "-",
            item["detail"] or "",
        )
    parts.append(hosts)
    if job.get("guests"):
        parts.append(guests_view(job["guests"], job.get("pause_budget_seconds")))
    return Group(*parts)


def guests_view(guests: Sequence[Mapping[str, Any]], budget: float | None) -> Table:
    title = "guests" + (f" (pause budget {budget:g} s)" if budget else "")
    table = Table(
        "guest",
        "host",
        "status",
        "pause ms",
        "clock skew ms",
        "sync",
        title=title,
        title_justify="left",
    )
    for g in guests:
        status = f"skipped: {g['skipped_reason']}" if g.get("skipped_reason") else g["status"]
        sync = f"{g['sync_method']}/{g['sync_outcome']}" if g.get("sync_outcome") else "-"
        table.add_row(
            g["guest"],
            g["host"],
            state_text(status),
            _num(g["pause_ms"]),
            _num(g["clock_skew_ms"], "{:+.3f}"),
            sync,
        )
    return table


def jobs_view(jobs: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("id", "state", "runbook", "hosts", "created", "by", "finished")
    for j in jobs:
        table.add_row(
            str(j["id"]),
            state_text(j["state"]),
            j["runbook"],
            ", ".join(j["hosts"]),
            j["created_at"],
            j["created_by"],
            j["finished_at"] or "-",
        )
    return table


def events_view(events: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("id", "at", "kind", "host", "guest", "message")
    for e in events:
        table.add_row(
            str(e["id"]), e["at"], e["kind"], e["host"] or "", e["guest"] or "", e["message"]
        )
    return table


def event_line(e: Mapping[str, Any]) -> str:
    where = "/".join(x for x in (e.get("host"), e.get("guest")) if x)
    return f"{e['at']} #{e['id']} {e['kind']}{' ' + where if where else ''}: {e['message']}"


def hosts_view(hosts: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("host", "uri", "update domain", "patch via", "sync clock", "labels", "source")
    for h in hosts:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(h["labels"].items()))
        table.add_row(
            h["name"],
            h["uri"],
            str(h["update_domain"]),
            h["patch_via"],
            "yes" if h["sync_clock"] else "no",
            labels,
            h["source"],
        )
    return table


def windows_view(windows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("window", "cron", "time zone", "minutes", "covers", "job", "next openings")
    for w in windows:
        covers = (
            ", ".join(w["hosts"])
            if w.get("hosts")
            else ", ".join(f"{k}={v}" for k, v in sorted((w.get("selector") or {}).items()))
        )
        job = (w.get("job") or {}).get("runbook", "")
        table.add_row(
            w["name"],
            w["cron"],
            w["timezone"],
            f"{w['duration_minutes']:g}",
            covers or "every host",
            job,
            "\n".join(w["next_openings"]),
        )
    return table


def plan_view(plan: Mapping[str, Any]) -> RenderableType:
    predicted = plan.get("predicted_pause_ms")
    head = Text(
        f"dry run: nothing created. {len(plan['hosts'])} host(s) in {len(plan['waves'])} "
        f"wave(s); pause budget {plan['pause_budget_seconds']:g} s; predicted pause "
        + ("unknown" if predicted is None else f"{predicted:.0f} ms")
    )
    waves = Table("wave", "hosts", "batches", "refused", title="waves", title_justify="left")
    for w in plan["waves"]:
        waves.add_row(
            str(w["update_domain"]),
            ", ".join(w["hosts"]),
            " | ".join(", ".join(b) for b in w["batches"]),
            "; ".join(f"{h}: {why}" for h, why in w["refused"].items()) or "-",
        )
    guests = Table("guest", "host", "action", "reason", title="guests", title_justify="left")
    for g in plan["guests"]:
        guests.add_row(g["guest"], g["host"], g["action"], g["reason"] or "")
    return Group(head, waves, guests)
