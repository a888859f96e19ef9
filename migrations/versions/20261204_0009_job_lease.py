"""One lease clock: jobs.heartbeat_at becomes jobs.lease_expires_at, renewed with the items'

A job's liveness was a heartbeat stamp judged against a grace; its items had an expiry. Both are
now an expiry, renewed together by the lease keeper and judged by one rule
(controller/work/ownership.py). A job's last stamp becomes its expiry.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    jobs = sa.table(
        "jobs",
        sa.column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.column("lease_expires_at", sa.DateTime(timezone=True)),
    )
    # The last stamp as the expiry: a job whose runner was upgraded away is reconciled at once.
    op.execute(jobs.update().values(lease_expires_at=jobs.c.heartbeat_at))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    jobs = sa.table(
        "jobs",
        sa.column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.column("lease_expires_at", sa.DateTime(timezone=True)),
    )
    op.execute(jobs.update().values(heartbeat_at=jobs.c.lease_expires_at))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_expires_at")
