"""fault tolerance: job_guests.status, journal_batches, health_probe

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_guests") as batch:
        batch.add_column(sa.Column("status", sa.String(length=16), nullable=True))
    op.create_table(
        "journal_batches",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_journal_batches")),
    )
    op.create_table(
        "health_probe",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_health_probe")),
    )
    # Before this revision an intent was resolved "flagged" after three failed resume attempts,
    # a refused connection included, and its guest could stay paused for good. Such an intent is
    # still ours: reopen it, and reconciliation settles it from libvirt's real state (resumed if
    # still paused by us, recorded if running, left alone if paused for another reason).
    op.execute(
        "UPDATE pause_intents SET resolved_at = NULL, resolution = NULL "
        "WHERE resolution = 'flagged'"
    )


def downgrade() -> None:
    op.drop_table("health_probe")
    op.drop_table("journal_batches")
    with op.batch_alter_table("job_guests") as batch:
        batch.drop_column("status")
