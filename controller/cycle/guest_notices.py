"""Telling the guests, through their agents: Scheduled Events documents and freeze/thaw hooks.

Used by the notice publisher (controller.daemon.publisher: during a notice and after the pause) and
by the engine (just before a host's first pause, and after its guests resumed and synced). All
of it runs outside the pause window: a hook's time counts against the notice, never against the
budget. A guest without an agent, or whose agent refuses file or exec commands, gets a recorded
warning and is otherwise unaffected.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from controller.errors import HypervisorError
from controller.hosts.hypervisor import Hypervisor
from controller.settings import MetadataSettings
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import Event
from controller.work import guest_documents as se

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 4096  # bytes of a hook's stdout and stderr kept in its event


@dataclass(frozen=True)
class HookRun:
    """One executable of the guest's hook directory, run with `phase event_id`."""

    guest: str
    phase: str  # freeze | thaw
    event_id: str
    hook: str | None  # None: the directory could not be listed (no hooks run)
    exit_code: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # the agent could not run it

    @property
    def ok(self) -> bool:
        return self.hook is not None and self.exit_code == 0 and self.error is None

    def event(self) -> tuple[str, str, dict[str, Any]]:
        what = f"{self.phase} hook {self.hook} in {self.guest}"
        if self.error is not None:
            message = f"{what}: not run ({self.error})"
        elif self.exit_code is None:
            message = f"{what}: still running after {self.seconds:.1f} s (timed out)"
        else:
            message = f"{what}: exit {self.exit_code} after {self.seconds:.2f} s"
        return (
            "guest_hook",
            message,
            {
                "phase": self.phase,
                "event_id": self.event_id,
                "hook": self.hook,
                "exit_code": self.exit_code,
                "duration_ms": round(self.seconds * 1000, 1),
                "stdout": self.stdout,
                "stderr": self.stderr,
                "error": self.error,
            },
        )


def agentless(uri: str) -> bool:
    """libvirt's test driver has no guest agents: nothing is written or run in its guests."""
    return uri.startswith("test:")


def _text(data: bytes) -> str:
    return data[:OUTPUT_LIMIT].decode("utf-8", "replace")


class GuestNotices:
    """What both the publisher and the engine do in guests. One per process: it knows which
    freeze hooks are running or ran here, so that a guest's hooks run once per event, until the
    event's job ended (the publisher's loop then forgets it, on every replica)."""

    def __init__(self, settings: MetadataSettings, agent_timeout: int) -> None:
        self.settings = settings
        self.agent_timeout = agent_timeout
        self._lock = threading.Lock()
        self._freezes: dict[tuple[str, str], threading.Event] = {}  # (event, guest) -> done

    def reaches(self, uri: str) -> bool:
        """Whether documents are written and hooks run in the guests of this host."""
        return self.settings.guest_agent and not agentless(uri)

    # --- documents ---------------------------------------------------------------------------

    def write(self, hv: Hypervisor, uuid: str, doc: se.Published) -> str | None:
        """Write the guest's document; None if written, else why not."""
        body = json.dumps({"DocumentIncarnation": doc.incarnation, "Events": doc.events})
        try:
            hv.write_guest_file(
                uuid, self.settings.document_path, body.encode() + b"\n", self.agent_timeout
            )
        except HypervisorError as exc:
            return str(exc)
        return None

    def record_write(
        self, s: Session, doc: se.Published, job_id: int | None, error: str | None
    ) -> None:
        if error is None:
            record_event(
                s,
                "scheduled_events_written",
                f"{doc.guest}: Scheduled Events document {doc.incarnation} written to "
                f"{self.settings.document_path} in the guest",
                job_id=job_id,
                host=doc.host,
                guest=doc.guest,
                incarnation=doc.incarnation,
                events=[e["EventId"] for e in doc.events],
            )
        else:
            record_event(
                s,
                "scheduled_events_not_written",
                f"{doc.guest}: Scheduled Events document not written through the agent: {error}",
                job_id=job_id,
                host=doc.host,
                guest=doc.guest,
                incarnation=doc.incarnation,
                error=error[:500],
                warning=True,
            )
        se.mark_pushed(s, doc.guest, doc.digest)

    # --- hooks -------------------------------------------------------------------------------

    def run_hooks(
        self, hv: Hypervisor, uuid: str, guest: str, phase: str, event_id: str
    ) -> list[HookRun]:
        """Run every executable of the hook directory, in name order, with `phase event_id`."""
        directory = self.settings.hooks_dir
        timeout = self.settings.hook_timeout_seconds
        try:
            listing = hv.guest_exec(uuid, ["/bin/ls", "-1", directory], self.agent_timeout)
        except HypervisorError as exc:
            return [HookRun(guest, phase, event_id, None, None, 0.0, error=str(exc)[:500])]
        if listing.exit_code != 0:
            return []  # no hook directory: nothing to run
        runs = []
        for name in sorted(n for n in _text(listing.stdout).splitlines() if n.strip()):
            path = f"{directory.rstrip('/')}/{name.strip()}"
            try:
                r = hv.guest_exec(uuid, [path, phase, event_id], timeout)
            except HypervisorError as exc:
                runs.append(HookRun(guest, phase, event_id, path, None, 0.0, error=str(exc)[:500]))
                continue
            runs.append(
                HookRun(
                    guest,
                    phase,
                    event_id,
                    path,
                    r.exit_code,
                    r.seconds,
                    _text(r.stdout),
                    _text(r.stderr),
                )
            )
        return runs

    def freeze_once(
        self,
        hv: Hypervisor,
        uuid: str,
        guest: str,
        event_id: str,
        record: Callable[[list[HookRun]], object],
        ran_before: Callable[[], bool] = lambda: False,
    ) -> list[HookRun] | None:
        """Run the guest's freeze hooks for this event unless they ran (or run) already: in
        this process (it waits for a run in progress), or anywhere before, as recorded
        (`ran_before`: another replica, or this service before a restart). None if they had."""
        key = (event_id, guest)
        with self._lock:
            done = self._freezes.get(key)
            mine = done is None
            if mine:
                done = self._freezes[key] = threading.Event()
        assert done is not None
        if not mine:
            done.wait(self.settings.hook_timeout_seconds * 2)
            return None
        try:
            if ran_before():
                return None
            runs = self.run_hooks(hv, uuid, guest, "freeze", event_id)
            record(runs)
            return runs
        finally:
            done.set()

    def froze(self, event_id: str, guest: str) -> bool:
        with self._lock:
            return (event_id, guest) in self._freezes

    def events_held(self) -> set[str]:
        """The events whose freeze hooks ran here (runs still in progress not counted)."""
        with self._lock:
            return {event for (event, _), done in self._freezes.items() if done.is_set()}

    def forget(self, event_ids: set[str]) -> None:
        """Forget the finished freeze runs of these events (their jobs ended): what this process
        remembers stays as large as the work in progress, not as all the work it ever did."""
        with self._lock:
            finished = [k for k, done in self._freezes.items() if done.is_set()]
            for key in [k for k in finished if k[0] in event_ids]:
                del self._freezes[key]


def freeze_ran(
    session_factory: sessionmaker[Session], *, job_id: int, guest: str, event_id: str
) -> bool:
    """Whether a freeze hook of this guest ran for this event, as recorded (a hook that could
    not be run, for want of an agent, does not count: it is tried again before the pause)."""
    with unit_of_work(session_factory, read_only=True) as s:
        rows = s.scalars(
            select(Event.details).where(
                Event.job_id == job_id, Event.kind == "guest_hook", Event.guest == guest
            )
        )
        return any(
            d.get("phase") == "freeze"
            and d.get("event_id") == event_id
            and d.get("hook") is not None
            and d.get("error") is None
            for d in rows
        )


def record_hooks(
    session_factory: sessionmaker[Session],
    runs: list[HookRun],
    *,
    job_id: int,
    host: str,
    approve: bool,
) -> list[int]:
    """Record hook runs; a guest whose freeze hooks all exited 0 approves its event. Returns the
    jobs whose notice may end early."""
    if not runs:
        return []
    jobs: list[int] = []
    with unit_of_work(session_factory) as s:
        for run in runs:
            kind, message, details = run.event()
            record_event(s, kind, message, job_id=job_id, host=host, guest=run.guest, **details)
        if approve and runs[0].phase == "freeze" and all(r.ok for r in runs):
            jobs = se.approve(s, runs[0].guest, [runs[0].event_id], actor=f"hook:{runs[0].guest}")
    return jobs
