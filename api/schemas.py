"""Request and response bodies. Unknown fields are rejected; every size is bounded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
)

from controller.services.tokens import Role
from controller.settings import (
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    SshConfig,
    WindowJobConfig,
)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# RFC 3339, UTC, always to the microsecond: 2026-11-22T02:40:58.019128Z
Timestamp = Annotated[
    datetime,
    PlainSerializer(_rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
GuestRef = Annotated[str, StringConstraints(min_length=1, max_length=255)]
ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")]
ParamValue = Annotated[str, StringConstraints(max_length=256)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN)]
MAX_ID = 2**63 - 1  # row ids are signed 64-bit on every backend


class _In(BaseModel):
    """Request bodies: unknown fields and type coercions ("1" for 1, 0 for false) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class JobCreate(_In):
    hosts: list[Name] | Literal["all"] | None = Field(
        default=None,
        description='The hosts by name, or "all"; leave out to select hosts by labels instead',
    )
    labels: dict[LabelKey, LabelValue] | None = Field(
        default=None,
        max_length=32,
        description="Select every host that carries all of these labels",
    )
    runbook: Name
    params: dict[ParamName, ParamValue] = Field(default_factory=dict, max_length=32)
    # Strict mode would want datetime objects; JSON brings RFC 3339 strings.
    not_before: AwareDatetime | None = Field(default=None, strict=False)
    not_after: AwareDatetime | None = Field(default=None, strict=False)
    pause_budget_seconds: float | None = Field(default=None, gt=0, le=300)
    notice_seconds: float | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="Publish the job's Scheduled Events this long before its first pause "
        "(default: the configured maintenance.notice_seconds, 900 unless changed)",
    )
    exclude_guests: list[GuestRef] = Field(default_factory=list, max_length=1000)
    busy_guests: Literal["skip", "block"] = "skip"
    max_failed_hosts: int = Field(
        default=0, ge=0, le=10000, description="Host failures tolerated before the rollout halts"
    )
    continue_on_failure: bool = Field(
        default=False, description="Try every host even after too many failures"
    )
    wave_pause_seconds: float = Field(
        default=0.0, ge=0, le=3600, description="Wait this long between update domains"
    )
    gate_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long the health gate after an update domain may wait before it fails",
    )
    max_parallel_hosts: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="Hosts of one update domain maintained at once (default: all of the domain)",
    )
    max_paused_per_availability_set: int | None = Field(
        default=None,
        ge=1,
        le=100000,
        description=(
            "Guests of one availability set (libvirt metadata <maintctl:maintenance "
            "availability-set=...>) paused at once across all hosts; may split a domain into "
            "smaller batches"
        ),
    )
    dry_run: bool = False
    window: Name | None = Field(
        default=None,
        description=(
            "Start only inside this maintenance window (GET /api/v1/windows); a host that would "
            "not finish before the window closes waits for its next opening"
        ),
    )
    qemu_refresh: Literal["stale", "always", "never"] | None = Field(
        default=None,
        description=(
            "Give guests a fresh QEMU process inside the pause, their memory kept: those whose "
            "QEMU runs a deleted binary or library (stale), every one (always) or none (never); "
            "default: as the runbook says"
        ),
    )


class _Out(BaseModel):
    """Response bodies, read straight from ORM rows and domain dataclasses."""

    model_config = ConfigDict(from_attributes=True)


class JobGuestPublic(_Out):
    host: str
    guest: str
    paused_at: Timestamp | None
    resumed_at: Timestamp | None
    pause_ms: float | None
    clock_skew_ms: float | None
    sync_method: str | None
    sync_outcome: str | None
    skipped_reason: str | None
    flagged: str | None
    status: str | None = Field(
        description="skipped, not_paused, paused, resume_pending, resumed (the good end) or flagged"
    )


class JobHostPublic(_Out):
    host: str
    wave: int = Field(description="The host's update domain: waves run lowest first, one at a time")
    state: str = Field(
        description="pending, notifying, running, done, failed, skipped, aborted or interrupted"
    )
    outcome: str | None
    detail: str | None
    started_at: Timestamp | None
    finished_at: Timestamp | None


class JobPublic(_Out):
    id: int
    state: str
    reason: str | None
    detail: str | None
    runbook: str
    params: dict[str, str]
    hosts: list[str] = Field(validation_alias="host_names")
    exclude_guests: list[str]
    busy_guests: str
    pause_budget_seconds: float
    notice_seconds: float
    rollout: dict[str, Any] = Field(
        description=(
            "max_failed_hosts, continue_on_failure, wave_pause_seconds, gate_timeout_seconds, "
            "max_parallel_hosts, max_paused_per_availability_set"
        )
    )
    not_before: Timestamp | None
    not_after: Timestamp | None
    created_by: str
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    guests: list[JobGuestPublic]
    items: list[JobHostPublic] = Field(description="Each host's progress, in rollout order")
    current_wave: int | None = Field(description="The update domain in progress, if any")
    window: str | None = Field(default=None, description="The maintenance window it starts in")
    qemu_refresh: str | None = Field(
        default=None, description="stale, always or never; null: as its runbook says"
    )


class PlannedGuestPublic(_Out):
    host: str
    guest: str
    action: Literal["pause", "skip"]
    reason: str | None
    qemu_stale: bool | None = Field(
        default=None, description="Its QEMU runs a deleted binary or library (null: not known)"
    )
    refresh_predicted_seconds: float | None = Field(
        default=None,
        description="If its QEMU is refreshed inside the pause: how long that is predicted to take",
    )


class PlannedWavePublic(_Out):
    update_domain: int
    hosts: list[str]
    predicted_pause_ms: dict[str, float | None] = Field(
        description="Per host: the median of this runbook's recent pauses there, if any"
    )
    batches: list[list[str]] = Field(
        description=(
            "The domain's hosts as they would run: batch after batch, the hosts of one batch at "
            "once (max_parallel_hosts, max_paused_per_availability_set)"
        )
    )
    refused: dict[str, str] = Field(
        description="Hosts that cannot run within max_paused_per_availability_set, and why"
    )


class PlannedStepPublic(_Out):
    step: Literal["prepare", "apply", "verify"]
    argv: list[str]
    timeout_seconds: float
    predicted_seconds: float | None = Field(
        description="Median of this step's recent durations on these hosts (None: no history)"
    )
    during_pause: bool = Field(description="Only apply runs while the guests are paused")


class PlanPublic(_Out):
    dry_run: Literal[True] = True
    hosts: list[str]
    waves: list[PlannedWavePublic] = Field(
        description="One per update domain, lowest first; no two waves have guests paused at once"
    )
    guests: list[PlannedGuestPublic]
    pause_budget_seconds: float
    predicted_pause_ms: float | None
    predicted_from: int
    steps: list[PlannedStepPublic] = Field(
        default_factory=list,
        description="The runbook's steps in order: prepare, apply (inside the pause), verify",
    )


class HostCreate(_In):
    name: Name
    uri: str = Field(
        min_length=4,
        max_length=512,
        pattern=r"^[a-z][a-z0-9+]*://\S*$",
        description="Any libvirt URI, e.g. qemu:///system or qemu+ssh://root@host/system",
    )
    update_domain: int = Field(default=0, ge=0, le=1000)
    patch_via: Literal["local", "ssh"] = Field(
        default="local", description='Where the runbook runs: "local" or "ssh" (on the host)'
    )
    ssh: SshConfig | None = Field(
        default=None,
        description=(
            "How to log in to the host (user, port, key_file, known_hosts, address, local_uri): "
            "needed for patch_via ssh and for a qemu+ssh uri (the guardian runs on the host)"
        ),
    )
    sync_clock: bool = True
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)


class HostPublic(_Out):
    name: str
    uri: str
    update_domain: int
    patch_via: str
    ssh: dict[str, Any] | None = Field(
        description="The ssh section, with address and local_uri filled in (None: local host)"
    )
    sync_clock: bool
    labels: dict[str, str]
    source: str


class GuestPublic(_Out):
    name: str
    uuid: str
    state: str
    reason: str
    active_job: str | None
    opted_out: bool
    unresponsive: bool = Field(
        default=False, description="Its QEMU does not answer: no job pauses it, nothing waits on it"
    )
    qemu_pid: int | None = Field(default=None, description="Its QEMU process, if found")
    qemu_stale: bool | None = Field(
        default=None,
        description="Its QEMU runs a deleted binary or library: an update does not reach it "
        "until its process is refreshed (null: not known)",
    )


class HostDetail(HostPublic):
    reachable: bool
    error: str | None = Field(
        description="Why libvirt did not answer: its own words for an admin, else only "
        "unreachable, refused, timed out or not found"
    )
    guests: list[GuestPublic]


class RunbookPublic(_Out):
    name: str
    description: str
    argv: list[str]
    timeout_seconds: float
    params: dict[str, str]


class EventPublic(_Out):
    id: int
    at: Timestamp
    kind: str
    job_id: int | None
    host: str | None
    guest: str | None
    actor: str
    message: str
    details: dict[str, Any]


class TokenCreate(_In):
    name: Name
    role: Role = Field(strict=False)


class TokenPublic(_Out):
    id: int
    name: str
    role: str
    created_at: Timestamp
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret, shown once; store it now.")


class HealthCheck(BaseModel):
    ok: bool
    detail: str


class DiskFreeCheck(HealthCheck):
    path: str | None = None
    free_bytes: int | None = None
    min_free_bytes: int


class LibvirtCheck(HealthCheck):
    hosts: dict[str, str] = Field(
        description='"ok", or a category (unreachable, refused, timed out, not found); an admin '
        "also reads libvirt's words after a colon"
    )


class HealthChecks(BaseModel):
    database_write: HealthCheck
    disk_free: DiskFreeCheck
    libvirt: LibvirtCheck


class Liveness(BaseModel):
    """What /healthz tells a caller without a token: no host, no error text."""

    status: Literal["ok", "degraded"] = Field(
        description='"degraded" when a host does not answer; 503 when the database takes no write'
    )
    checks: dict[str, bool] = Field(
        description="database_write, disk_free, libvirt: which passed, without details (a "
        "token shows those)"
    )
    checked_at: Timestamp = Field(
        description="When readiness was last checked; it is checked at most once a second."
    )


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str = Field(description='"ok" or "error: <kind>"; checks.database_write has more.')
    hosts: dict[str, str]
    checks: HealthChecks
    outbox_backlog: int = Field(description="Record batches waiting for the database.")
    runner: str = Field(description="This replica's runner id (host:pid:start time).")
    leader: bool = Field(
        description="Whether this replica runs the timers and the sweep (one replica at a time)."
    )


# --- the dashboard (controller/services/dashboard.py) --------------------------------------------


class DashboardHostPublic(_Out):
    name: str
    update_domain: int
    state: Literal["idle", "notifying", "in_maintenance", "unreachable"]
    guests: int = Field(description="Guests last seen on the host (refreshed at each preflight)")
    paused: int = Field(description="Of those, guests last seen paused")
    job_id: int | None = Field(description="The open job holding the host, if any")
    stale: int = Field(
        default=0,
        description="Of those, guests whose QEMU runs a deleted binary or library (a job's "
        "QEMU refresh gives them a fresh process)",
    )


class DashboardDomainPublic(_Out):
    update_domain: int
    hosts: list[DashboardHostPublic]


class DashboardItemPublic(_Out):
    host: str
    wave: int
    state: str


class DashboardJobPublic(_Out):
    id: int
    state: str
    runbook: str
    hosts: list[str]
    not_before: Timestamp | None
    created_at: Timestamp
    started_at: Timestamp | None
    current_wave: int | None
    waves_total: int
    waves_done: int
    hosts_total: int
    hosts_done: int
    items: list[DashboardItemPublic] = Field(description="Each host's progress, in rollout order")


class DashboardGuestPublic(_Out):
    host: str
    guest: str
    status: str | None
    pause_ms: float | None
    budget_ms: float
    clock_skew_ms: float | None
    sync_outcome: str | None
    note: str | None = Field(description="Why the guest was skipped or flagged")


class DashboardLatestJobPublic(_Out):
    id: int
    state: str
    runbook: str
    pause_budget_seconds: float
    started_at: Timestamp | None
    finished_at: Timestamp | None
    guests: list[DashboardGuestPublic]


class DashboardPausesPublic(_Out):
    job_id: int
    state: str
    pause_budget_seconds: float
    pauses_ms: list[float]


class DashboardEventPublic(_Out):
    id: int
    at: Timestamp
    kind: str
    job_id: int | None
    host: str | None
    guest: str | None
    message: str


class DashboardPublic(_Out):
    pause_budget_seconds: float = Field(description="The default pause budget (the chart's line)")
    domains: list[DashboardDomainPublic] = Field(description="Hosts by update domain")
    jobs: list[DashboardJobPublic] = Field(description="Running jobs, then upcoming ones")
    latest_job: DashboardLatestJobPublic | None = Field(
        description="The newest job that has started, with each guest's outcome"
    )
    pause_history: list[DashboardPausesPublic] = Field(
        description="Measured guest pauses of recent jobs, oldest first"
    )
    events: list[DashboardEventPublic] = Field(description="The latest events, newest first")
    last_event_id: int = Field(description="Stream from here: /api/v1/events/stream?after=")


class WindowCreate(_In):
    name: Name
    cron: str = Field(
        min_length=1,
        max_length=200,
        description="5 fields as in crontab (weekday 0 or 7 = Sunday) or 6 with seconds first",
    )
    timezone: str = Field(default="UTC", min_length=1, max_length=64, examples=["Europe/Amsterdam"])
    duration_minutes: float = Field(gt=0, le=7 * 24 * 60)
    hosts: list[Name] | None = Field(default=None, min_length=1, max_length=10000)
    selector: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=32)
    job: WindowJobConfig | None = Field(
        default=None, description="A job (runbook, params) the window submits each time it opens"
    )


class WindowPublic(BaseModel):
    name: str
    source: str = Field(description='"config" (the config file) or "api"')
    cron: str
    timezone: str
    duration_minutes: float
    hosts: list[str] | None
    selector: dict[str, str] | None
    job: dict[str, Any] | None = Field(description="The job it submits when it opens, if any")
    next_openings: list[str] = Field(
        description=(
            "The next three openings, ISO 8601 in the window's time zone with its UTC offset "
            "(2026-12-01T02:00:00+01:00)"
        )
    )


class FreezePublic(BaseModel):
    name: str
    start: datetime
    end: datetime
    reason: str
    hosts: list[str] | None
    selector: dict[str, str] | None
    active: bool
