"""Scheduled Events: job_hosts.event_id/resources/approved_at, guest_documents, counters

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def upgrade() -> None:
    with op.batch_alter_table("job_hosts") as batch:
        batch.add_column(sa.Column("event_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("resources", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_unique_constraint("uq_job_hosts_event_id", ["event_id"])
    op.create_table(
        "guest_documents",
        sa.Column("guest", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=63), nullable=True),
        sa.Column("incarnation", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("pushed_digest", sa.String(length=64), nullable=True),
        sa.Column("addresses", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("guest", name=op.f("pk_guest_documents")),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )

def downgrade() -> None:
    op.drop_table("counters")
    op.drop_table("guest_documents")
    with op.batch_alter_table("job_hosts") as batch:
        batch.drop_constraint("uq_job_hosts_event_id", type_="unique")
        batch.drop_column("approved_at")
        batch.drop_column("resources")
        batch.drop_column("event_id")
