"""`maintctl jobs ...`, `maintctl hosts` and `maintctl windows`: reading jobs, hosts and
maintenance windows, cancelling and aborting jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import render
from cli.options import (
    DEFAULT_SERVER,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    client_errors,
    connect,
)

jobs_app = typer.Typer(help="Maintenance jobs on the server.", no_args_is_help=True)
JobIdArg = Annotated[int, typer.Argument(min=1, help="The job's id")]


@jobs_app.command("list")
@client_errors
def jobs_list(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state")] = None,
    host: Annotated[str | None, typer.Option(help="Only jobs on this host")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many")] = 50,
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Jobs, newest first."""
    with connect(server, token) as client:
        jobs = client.jobs(state=state, host=host, limit=limit)
    render.emit(jobs, output, render.jobs_view(jobs))


@jobs_app.command("show")
@client_errors
def jobs_show(
    job_id: JobIdArg,
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """One job with each host's and each guest's outcome."""
    with connect(server, token) as client:
        job = client.job(job_id)
    render.emit(job, output, render.job_view(job))


@jobs_app.command("events")
@client_errors
def jobs_events(
    job_id: JobIdArg,
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Every event of one job, oldest first."""
    with connect(server, token) as client:
        events = client.events(job_id)
    render.emit(events, output, render.events_view(events))


@jobs_app.command("cancel")
@client_errors
def jobs_cancel(
    job_id: JobIdArg,
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Cancel a job that has not started pausing guests."""
    with connect(server, token) as client:
        job = client.cancel(job_id)
    render.emit(job, output, render.job_view(job))


@jobs_app.command("abort")
@client_errors
def jobs_abort(
    job_id: JobIdArg,
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Abort a running job: its runbook is killed and every guest resumed now."""
    with connect(server, token) as client:
        job = client.abort(job_id)
    render.emit(job, output, render.job_view(job))


@client_errors
def hosts(
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """The hosts the server maintains."""
    with connect(server, token) as client:
        listing = client.hosts()
    render.emit(listing, output, render.hosts_view(listing))


@client_errors
def windows(
    output: OutputOpt = Output.TABLE,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """The maintenance windows, each with its next three openings."""
    with connect(server, token) as client:
        listing = client.windows()
    render.emit(listing, output, render.windows_view(listing))
