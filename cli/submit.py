"""`maintctl submit`: one maintenance job from a person or a CI pipeline."""

from __future__ import annotations

import os
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from cli import render
from cli.ci import idempotency_key, write_github
from cli.client import JSON, WaitTimeout
from cli.options import (
    DEFAULT_SERVER,
    BadUsage,
    Output,
    OutputOpt,
    ServerOpt,
    StrictOpt,
    TokenOpt,
    client_errors,
    connect,
    state_exit_code,
)

FINISHED_ITEMS = {"done", "failed", "skipped", "aborted", "interrupted"}


class QemuRefresh(StrEnum):
    STALE = "stale"
    ALWAYS = "always"
    NEVER = "never"


def pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise BadUsage(f"{option} wants key=value, not {value!r}")
        out[key] = val
    return out


def timestamp(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadUsage(f"{option}: {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise BadUsage(f"{option}: give a time zone, e.g. {value}Z or {value}+01:00")
    return parsed.isoformat()


def job_body(
    *,
    hosts: list[str],
    all_hosts: bool,
    selector: list[str],
    runbook: str,
    params: list[str],
    not_before: str | None,
    budget: float | None,
    notice: float | None,
    max_failed_hosts: int | None,
    dry_run: bool,
    qemu_refresh: str | None = None,
) -> dict[str, Any]:
    if sum([bool(hosts), all_hosts, bool(selector)]) != 1:
        raise BadUsage("choose the hosts with one of --host, --all or --selector")
    body: dict[str, Any] = {"runbook": runbook, "params": pairs(params, "--param")}
    if hosts:
        body["hosts"] = hosts
    elif all_hosts:
        body["hosts"] = "all"
    else:
        body["labels"] = pairs(selector, "--selector")
    optional = {
        "not_before": timestamp(not_before, "--not-before"),
        "pause_budget_seconds": budget,
        "notice_seconds": notice,
        "max_failed_hosts": max_failed_hosts,
        "qemu_refresh": qemu_refresh,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if dry_run:
        body["dry_run"] = True
    return body


class WaitProgress:
    """The job's progress on stderr while --wait polls: a bar on a terminal, else a line per
    change (CI logs)."""

    def __init__(self) -> None:
        self.last: tuple[Any, ...] | None = None
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        if render.stderr.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=render.stderr,
                transient=True,
            )
            self.bar.start()

    def __call__(self, job: JSON) -> None:
        items = job.get("items", [])
        finished = sum(1 for i in items if i["state"] in FINISHED_ITEMS)
        wave = job.get("current_wave")
        where = "" if wave is None else f", wave {wave}"
        description = f"job {job['id']}: {job['state']}{where}"
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(description, total=len(items) or None)
            self.bar.update(self.task, description=description, completed=finished)
            return
        now = (job["state"], wave, finished)
        if now != self.last:
            self.last = now
            render.stderr.print(f"{description}, {finished}/{len(items)} host(s) finished")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@client_errors
def submit(
    runbook: Annotated[str, typer.Option(help="A runbook declared in the server's config")],
    host: Annotated[list[str], typer.Option("--host", help="A host by name; repeatable")] = [],  # noqa: B006
    all_hosts: Annotated[bool, typer.Option("--all", help="Every host")] = False,
    selector: Annotated[
        list[str], typer.Option(help="Hosts carrying label k=v; repeatable (all must match)")
    ] = [],  # noqa: B006
    param: Annotated[list[str], typer.Option(help="Runbook parameter k=v; repeatable")] = [],  # noqa: B006
    not_before: Annotated[
        str | None, typer.Option(help="Start no earlier than this ISO 8601 time (with zone)")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="Pause budget in seconds (server default: 30)")
    ] = None,
    notice: Annotated[
        float | None, typer.Option(help="Announce the maintenance this many seconds ahead")
    ] = None,
    max_failed_hosts: Annotated[
        int | None, typer.Option(help="Host failures tolerated before the rollout halts")
    ] = None,
    qemu_refresh: Annotated[
        QemuRefresh | None,
        typer.Option(help="Which guests get a fresh QEMU process (default: the runbook's)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show the plan; create nothing")] = False,
    wait: Annotated[
        bool, typer.Option(help="Wait for the job to end; the exit code tells how it ended")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, help="With --wait: give up after this many seconds (exit 3)"),
    ] = None,
    output: OutputOpt = Output.TABLE,
    strict: StrictOpt = False,
    idempotency_key_opt: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Default: derived from the CI run (GitHub Actions, GitLab CI), else random",
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Submit a maintenance job; with --wait, exit 0 succeeded, 1 failed, 3 timeout (docs/ci.md)."""
    body = job_body(
        hosts=host, all_hosts=all_hosts, selector=selector, runbook=runbook, params=param,
        not_before=not_before, budget=budget, notice=notice,
        max_failed_hosts=max_failed_hosts, dry_run=dry_run,
        qemu_refresh=None if qemu_refresh is None else qemu_refresh.value,
    )  # fmt: skip
    key = idempotency_key(idempotency_key_opt, os.environ, body)
    with connect(server, token) as client:
        submitted = client.submit(body, idempotency_key=key)
        if dry_run:
            render.emit(submitted.job, output, render.plan_view(submitted.job))
            return
        job = submitted.job
        note = " (replayed: this Idempotency-Key already made it)" if submitted.replayed else ""
        render.stderr.print(f"job {job['id']} {job['state']}{note}; idempotency key {key}")
        if wait:
            progress = WaitProgress()
            try:
                job = client.wait(job["id"], timeout=timeout, on_poll=progress)
            except WaitTimeout as exc:
                finish(exc.job, server, output)
                raise
            finally:
                progress.stop()
        finish(job, server, output)
    if wait:
        raise typer.Exit(state_exit_code(job["state"], strict=strict))


def finish(job: JSON, server: str, output: Output) -> None:
    write_github(job, server, os.environ)
    render.emit(job, output, render.job_view(job))
