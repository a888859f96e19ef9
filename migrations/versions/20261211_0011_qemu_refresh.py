"""QEMU refresh: pause_intents.image_path, jobs.qemu_refresh, guests.qemu_stale

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pause_intents") as batch:
        batch.add_column(sa.Column("image_path", sa.String(length=1024), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("qemu_refresh", sa.String(length=16), nullable=True))
    with op.batch_alter_table("guests") as batch:
        batch.add_column(sa.Column("qemu_stale", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("guests") as batch:
        batch.drop_column("qemu_stale")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("qemu_refresh")
    with op.batch_alter_table("pause_intents") as batch:
        batch.drop_column("image_path")
