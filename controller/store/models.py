"""Tables. The schema is created only by Alembic migrations (migrations/), never create_all."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC, returns timezone-aware UTC datetimes on every backend (SQLite has no tz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    uri: Mapped[str] = mapped_column(String(512))
    update_domain: Mapped[int] = mapped_column(Integer, default=0)
    # Where the runbook runs: "local" (the controller's machine) or "ssh" (on the host).
    patch_via: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    # settings.SshConfig as resolved (address and local_uri filled in); None for a local host.
    ssh: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    sync_clock: Mapped[bool] = mapped_column(Boolean, default=True)
    # Free key/value labels (rack, row, hardware generation): jobs select hosts by them.
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    # "config" hosts are rewritten from the config file at start; "api" hosts are managed by admins.
    source: Mapped[str] = mapped_column(String(16), default="api")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    guests: Mapped[list[Guest]] = relationship(back_populates="host", cascade="all, delete-orphan")


class Guest(Base):
    """The last known view of a guest; libvirt stays the truth."""

    __tablename__ = "guests"
    __table_args__ = (UniqueConstraint("host_id", "uuid", name="uq_guests_host_uuid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    uuid: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(255))
    last_state: Mapped[str] = mapped_column(String(32), default="unknown")
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The addresses libvirt learned for it from outside the guest (DHCP leases, ARP) on
    # interfaces the network keeps honest: who is asking, for the metadata listener.
    addresses: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")
    # Its QEMU process runs a deleted binary or library (None: not known, or not running).
    qemu_stale: Mapped[bool | None] = mapped_column(Boolean, default=None)

    host: Mapped[Host] = relationship(back_populates="guests")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_not_before", "state", "not_before"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    state: Mapped[str] = mapped_column(String(32), default="scheduled")
    reason: Mapped[str | None] = mapped_column(String(64), default=None)
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    runbook: Mapped[str] = mapped_column(String(63))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    host_names: Mapped[list[Any]] = mapped_column(default=list)
    exclude_guests: Mapped[list[Any]] = mapped_column(default=list)
    busy_guests: Mapped[str] = mapped_column(String(16), default="skip")
    pause_budget_seconds: Mapped[float] = mapped_column(Float)
    notice_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # How the job rolls out over its hosts (decisions.rollout.RolloutPolicy, as stored).
    rollout: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    not_after: Mapped[datetime | None] = mapped_column(default=None)
    created_by: Mapped[str] = mapped_column(String(63), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    abort_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Which controller process runs the job, and until when it holds it (work/ownership.py): the
    # same lease its items have, renewed with them.
    runner_id: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # The maintenance window (settings.windows) the job may start in, if any.
    window: Mapped[str | None] = mapped_column(String(63), default=None)
    # Whether guests get a fresh QEMU process inside the pause (stale | always | never); None:
    # as its runbook says.
    qemu_refresh: Mapped[str | None] = mapped_column(String(16), default=None)

    guests: Mapped[list[JobGuest]] = relationship(
        back_populates="job", order_by="JobGuest.id", cascade="all, delete-orphan"
    )
    # The job's hosts in rollout order (read-only here: work/lifecycle.py changes them).
    items: Mapped[list[JobHost]] = relationship(
        order_by=lambda: (JobHost.wave, JobHost.position), viewonly=True
    )

    @property
    def current_wave(self) -> int | None:
        """The update domain being maintained now, if any."""
        return current_wave(self.items)


def current_wave(items: Iterable[Any]) -> int | None:
    """The update domain being maintained now among a job's items (rows or objects), if any."""
    held = [i.wave for i in items if i.state in ("notifying", "running")]
    return min(held) if held else None


class JobGuest(Base):
    """One guest's outcome in one job."""

    __tablename__ = "job_guests"
    __table_args__ = (UniqueConstraint("job_id", "host", "guest_uuid", name="uq_job_guests_key"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(63))
    guest: Mapped[str] = mapped_column(String(255))
    guest_uuid: Mapped[str] = mapped_column(String(36))
    paused_at: Mapped[datetime | None] = mapped_column(default=None)
    resumed_at: Mapped[datetime | None] = mapped_column(default=None)
    pause_ms: Mapped[float | None] = mapped_column(Float, default=None)
    clock_skew_ms: Mapped[float | None] = mapped_column(Float, default=None)
    sync_method: Mapped[str | None] = mapped_column(String(16), default=None)
    sync_outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    skipped_reason: Mapped[str | None] = mapped_column(String(255), default=None)
    # Set when the guest was found paused for a reason not ours, shut off, or gone: left alone.
    flagged: Mapped[str | None] = mapped_column(String(255), default=None)
    # skipped | not_paused | paused | resume_pending | resumed | flagged (GuestStatus)
    status: Mapped[str | None] = mapped_column(String(16), default=None)

    job: Mapped[Job] = relationship(back_populates="guests")


class JobHost(Base):
    """One host of one job: the durable work item, claimed by one owner under a lease.

    The owner renews lease_expires_at for as long as it holds the item; epoch grows at every
    claim and takeover, so a stale owner's conditional updates (owner and epoch) match nothing.
    """

    __tablename__ = "job_hosts"
    __table_args__ = (
        UniqueConstraint("job_id", "host", name="uq_job_hosts_job_id_host"),
        Index("ix_job_hosts_host_state", "host", "state"),
        Index("ix_job_hosts_state_lease", "state", "lease_expires_at"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(63))
    wave: Mapped[int] = mapped_column(Integer, default=0)  # the host's update domain
    position: Mapped[int] = mapped_column(Integer, default=0)  # order within the job
    # pending | notifying | running | done | failed | skipped | aborted | interrupted
    state: Mapped[str] = mapped_column(String(16), default="pending")
    owner: Mapped[str | None] = mapped_column(String(128), default=None)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    notice_until: Mapped[datetime | None] = mapped_column(default=None)
    abort_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    outcome: Mapped[str | None] = mapped_column(String(64), default=None)
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    # The item's Scheduled Event: its id, the guests it will pause (filled in during the notice,
    # fixed at the preflight), and when a guest (or its freeze hook) approved it early.
    event_id: Mapped[str | None] = mapped_column(String(36), default=None, unique=True)
    resources: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    approved_at: Mapped[datetime | None] = mapped_column(default=None)


class GuestDocument(Base):
    """The Scheduled Events document one guest sees, kept so that its DocumentIncarnation only
    grows (across restarts and replicas) and a GET only reads. `pushed_digest` is the content
    last written into the guest through its agent."""

    __tablename__ = "guest_documents"
    guest: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str | None] = mapped_column(String(63), default=None)  # of its latest event
    incarnation: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    events: Mapped[list[Any]] = mapped_column(JSON)
    pushed_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """Named counters that only grow: `UPDATE ... SET value = value + 1 RETURNING value`."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class PauseIntent(Base):
    """Write-ahead record of a guest we are about to pause; resolved once it runs again."""

    __tablename__ = "pause_intents"
    __table_args__ = (Index("ix_pause_intents_unresolved", "resolved_at"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(63))
    host_uri: Mapped[str] = mapped_column(String(512))
    guest: Mapped[str] = mapped_column(String(255))
    guest_uuid: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    resolution: Mapped[str | None] = mapped_column(String(32), default=None)
    # Where the guest's image would be while its QEMU is refreshed (saved, not yet restored):
    # committed with the intent, before any pause, so that a crash never leaves an image
    # nobody knows of. None: the job refreshes nothing on this host.
    image_path: Mapped[str | None] = mapped_column(String(1024), default=None)


class JournalBatch(Base):
    """A batch replayed from the local journal; marks it applied in the same transaction."""

    __tablename__ = "journal_batches"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(default=utcnow)


class HealthProbe(Base):
    """One row /healthz rewrites to prove the database accepts writes."""

    __tablename__ = "health_probe"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Append-only timeline. The id orders events and resumes SSE streams."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(48), index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True, default=None
    )
    host: Mapped[str | None] = mapped_column(String(63), default=None)
    guest: Mapped[str | None] = mapped_column(String(255), default=None)
    actor: Mapped[str] = mapped_column(String(63), default="controller")
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class IdempotencyKey(Base):
    """Lets CI retry POST /jobs safely; a row without job_id is a request still in flight."""

    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MaintenanceWindow(Base):
    """A maintenance window declared through the API (admin); config windows stay in the file.

    The columns are settings.WindowConfig's: hosts or selector, and the optional job template."""

    __tablename__ = "maintenance_windows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    duration_minutes: Mapped[float] = mapped_column(Float)
    hosts: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    selector: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    job: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    created_by: Mapped[str] = mapped_column(String(63), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
