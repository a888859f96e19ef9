"""hosts.ssh: how to log in to a remote host; hosts.patch_via defaults to 'local'

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("ssh", sa.JSON(none_as_null=True), nullable=True))
        batch.alter_column(
            "patch_via",
            existing_type=sa.String(length=16),
            existing_nullable=False,
            server_default="local",
        )


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.alter_column(
            "patch_via",
            existing_type=sa.String(length=16),
            existing_nullable=False,
            server_default=None,
        )
        batch.drop_column("ssh")
