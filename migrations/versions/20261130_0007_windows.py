"""jobs.window: the maintenance window a job may start in; maintenance_windows: those
declared through the API

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("window", sa.String(length=63), nullable=True))
    op.create_table(
        "maintenance_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("duration_minutes", sa.Float(), nullable=False),
        sa.Column("hosts", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("selector", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("job", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_by", sa.String(length=63), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_maintenance_windows")),
        sa.UniqueConstraint("name", name=op.f("uq_maintenance_windows_name")),
    )


def downgrade() -> None:
    op.drop_table("maintenance_windows")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("window")
