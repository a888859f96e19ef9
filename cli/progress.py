"""A job's progress folded from its events, for `maintctl watch`. Pure: no I/O.

It starts from the job document (hosts and their waves) and follows the event log, so the same
fold serves the history read at start and the live stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cli.client import TERMINAL_STATES

JOB_STATES = TERMINAL_STATES | {"scheduled", "notifying", "running"}
HOST_END = {"done", "failed", "skipped", "aborted", "interrupted"}


@dataclass
class GuestProgress:
    phase: str = "pending"
    pause_ms: float | None = None
    skew_ms: float | None = None
    sync: str | None = None


@dataclass
class HostProgress:
    wave: int
    phase: str = "pending"
    guests: dict[str, GuestProgress] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.phase in HOST_END

    @property
    def guests_back(self) -> int:
        return sum(1 for g in self.guests.values() if g.phase in {"resumed", "skipped"})


@dataclass
class JobProgress:
    job_id: int
    state: str
    budget_seconds: float
    hosts: dict[str, HostProgress]
    last_event_id: int = 0

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> JobProgress:
        hosts = {i["host"]: HostProgress(i["wave"], i["state"]) for i in job.get("items", [])}
        return cls(job["id"], job["state"], job["pause_budget_seconds"], hosts)

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    def waves(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name, h in sorted(self.hosts.items(), key=lambda kv: (kv[1].wave, kv[0])):
            out.setdefault(h.wave, []).append(name)
        return out

    def _host(self, name: str) -> HostProgress:
        return self.hosts.setdefault(name, HostProgress(wave=0))

    def apply(self, event: Mapping[str, Any]) -> None:
        """Fold one event of this job into the progress (events of other jobs are ignored)."""
        if event.get("job_id") != self.job_id:
            return
        self.last_event_id = max(self.last_event_id, int(event["id"]))
        kind, details = event["kind"], event.get("details") or {}
        host, guest = event.get("host"), event.get("guest")
        if kind.startswith("job_") and kind[4:] in JOB_STATES:
            self.state = kind[4:]
        elif kind == "wave_started":
            for name in details.get("hosts", []):
                self._host(name).wave = int(details["wave"])
        elif kind == "wave_finished":
            failed = set(details.get("failed", []))
            for name, h in self.hosts.items():
                if h.wave == details.get("wave") and not h.finished:
                    h.phase = "failed" if name in failed else "done"
        elif host is not None:
            self._apply_host(self._host(host), kind, details, guest)

    def _apply_host(
        self, h: HostProgress, kind: str, details: Mapping[str, Any], guest: str | None
    ) -> None:
        phases = {"preflight_done": "preflight", "pausing": "pausing",
                  "runbook_started": "patching", "runbook_finished": "resuming"}  # fmt: skip
        if kind in phases:
            h.phase = phases[kind]
        if kind == "pausing":
            for name in details.get("guests", []):
                h.guests.setdefault(name, GuestProgress())
        if guest is None:
            return
        g = h.guests.setdefault(guest, GuestProgress())
        if kind == "guest_paused":
            g.phase = "paused"
        elif kind == "guest_skipped":
            g.phase = "skipped"
        elif kind == "guest_resumed":
            g.phase, g.pause_ms = "resumed", details.get("pause_ms")
        elif kind == "guest_not_resumed":
            g.phase = "flagged"
        elif kind in {"clock_synced", "clock_sync_failed"}:
            g.skew_ms = details.get("skew_ms")
            g.sync = f"{details.get('method')}/{details.get('outcome')}"
