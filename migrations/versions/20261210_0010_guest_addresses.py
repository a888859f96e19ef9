"""Who is asking the metadata listener: addresses move from the Scheduled Events documents to the
guests themselves.

Identity used to come from the documents' `addresses`, filled (for guests with an event) from what
the guest's own agent reported, which a hostile guest can choose. The guests table now keeps the
addresses libvirt learned from outside the guest (DHCP leases, ARP) for every guest, so that a
guest without an event is known too (instance metadata). The old column is dropped: nothing it
held may be trusted.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("guests") as batch:
        batch.add_column(sa.Column("addresses", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("guest_documents") as batch:
        batch.drop_column("addresses")


def downgrade() -> None:
    with op.batch_alter_table("guest_documents") as batch:
        batch.add_column(sa.Column("addresses", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("guests") as batch:
        batch.drop_column("addresses")
