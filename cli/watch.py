"""`maintctl watch ID`: a job's progress live from the server's event stream.

On a terminal: bars per wave, host and guest, redrawn as events arrive. Otherwise (CI logs,
pipes): one line per event, or one JSON document per line with --output json. A dropped
stream is reopened with Last-Event-ID, so no event is lost or shown twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli import render
from cli.client import JSON, MaintctlClient
from cli.options import (
    DEFAULT_SERVER,
    Output,
    OutputOpt,
    ServerOpt,
    StrictOpt,
    TokenOpt,
    client_errors,
    connect,
    state_exit_code,
)
from cli.progress import JobProgress

BAR_WIDTH = 24


def progress_view(p: JobProgress) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    for wave, names in p.waves().items():
        done = sum(1 for n in names if p.hosts[n].finished)
        grid.add_row(
            Text(f"wave {wave}", style="bold"),
            ProgressBar(total=len(names), completed=done, width=BAR_WIDTH),
            f"{done}/{len(names)} host(s)",
            "",
        )
        for name in names:
            h = p.hosts[name]
            grid.add_row(
                f"  {name}",
                ProgressBar(total=max(len(h.guests), 1), completed=h.guests_back, width=BAR_WIDTH),
                f"{h.guests_back}/{len(h.guests)} guest(s) back",
                render.state_text(h.phase),
            )
            for guest, g in sorted(h.guests.items()):
                pause = "" if g.pause_ms is None else f"paused {g.pause_ms:.1f} ms"
                skew = "" if g.skew_ms is None else f", skew {g.skew_ms:+.3f} ms"
                grid.add_row(
                    f"    {guest}",
                    render.state_text(g.phase),
                    f"{pause} of {p.budget_seconds:g} s{skew}" if pause else "",
                    g.sync or "",
                )
    head = Text.assemble((f"job {p.job_id}: ", "bold"), render.state_text(p.state))
    return Group(head, grid)


def job_events(
    client: MaintctlClient, progress: JobProgress, on_reconnect: Callable[[int], None]
) -> Iterator[JSON]:
    """The job's events: its history first, then live ones until it ends."""
    for event in client.events(progress.job_id):
        yield event
    if progress.ended:
        return
    stream = client.stream_events(after=progress.last_event_id, on_reconnect=on_reconnect)
    for sse in stream:
        event = sse.json()
        if event.get("job_id") == progress.job_id:
            yield event
            if progress.ended:
                return


@client_errors
def watch(
    job_id: Annotated[int, typer.Argument(min=1, help="The job's id")],
    output: OutputOpt = Output.TABLE,
    strict: StrictOpt = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Follow a job live until it ends; exits like `submit --wait` (0, 1, or 6 with --strict)."""

    def dropped(last: int) -> None:
        render.stderr.print(f"maintctl: event stream dropped; resuming after event {last}")

    live_view = output is Output.TABLE and render.stdout.is_terminal
    with connect(server, token) as client:
        progress = JobProgress.from_job(client.job(job_id))
        events = job_events(client, progress, dropped)
        if live_view:
            with Live(progress_view(progress), console=render.stdout, auto_refresh=False) as live:
                for event in events:
                    progress.apply(event)
                    live.update(progress_view(progress), refresh=True)
        else:
            for event in events:
                progress.apply(event)
                line = json.dumps(event) if output is Output.JSON else render.event_line(event)
                typer.echo(line)
        job = client.job(job_id)
    if output is Output.TABLE:
        render.stdout.print(render.job_view(job))
    raise typer.Exit(state_exit_code(job["state"], strict=strict))
