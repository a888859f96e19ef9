"""job_hosts: durable per-host work items with leases

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 10:00:00
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# What an existing job's hosts become: its own state, as far as it says anything per host.
BACKFILL = {
    "scheduled": "pending",
    "notifying": "pending",
    "running": "pending",
    "succeeded": "done",
    "succeeded_with_warnings": "done",
    "failed": "failed",
    "cancelled": "skipped",
    "expired": "skipped",
    "aborted": "aborted",
    "interrupted": "interrupted",
}


def upgrade() -> None:
    op.create_table(
        "job_hosts",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("host", sa.String(length=63), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notice_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("abort_requested", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_hosts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_hosts")),
        sa.UniqueConstraint("job_id", "host", name="uq_job_hosts_job_id_host"),
    )
    with op.batch_alter_table("job_hosts") as batch:
        batch.create_index(batch.f("ix_job_hosts_job_id"), ["job_id"], unique=False)
        batch.create_index("ix_job_hosts_host_state", ["host", "state"], unique=False)
        batch.create_index("ix_job_hosts_state_lease", ["state", "lease_expires_at"], unique=False)

    conn = op.get_bind()
    waves = dict(conn.execute(sa.text("SELECT name, update_domain FROM hosts")).all())
    jobs = conn.execute(sa.text("SELECT id, state, host_names FROM jobs")).all()
    table = sa.table(
        "job_hosts",
        sa.column("job_id", BigId),
        sa.column("host", sa.String),
        sa.column("wave", sa.Integer),
        sa.column("position", sa.Integer),
        sa.column("state", sa.String),
        sa.column("epoch", sa.Integer),
        sa.column("abort_requested", sa.Boolean),
        sa.column("outcome", sa.String),
    )
    rows = []
    for job_id, state, host_names in jobs:
        names = host_names if isinstance(host_names, list) else json.loads(host_names)
        for position, name in enumerate(names):
            rows.append(
                {
                    "job_id": job_id,
                    "host": name,
                    "wave": waves.get(name, 0),
                    "position": position,
                    "state": BACKFILL.get(state, "interrupted"),
                    "epoch": 0,
                    "abort_requested": False,
                    "outcome": None if BACKFILL.get(state) == "pending" else "backfilled",
                }
            )
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    op.drop_table("job_hosts")
