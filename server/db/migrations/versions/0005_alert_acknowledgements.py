"""alert acknowledgements

Revision ID: 0005
Revises: 0004

Operators acknowledge a raised alert (``POST /api/v1/alerts/{id}/acknowledge``): who, when and
their note, one row per alert, in a table of its own so ``alerts`` keeps the evaluator as its one
writer. Only a new table: nothing to fill on an existing database.
Create Date: 2026-12-07 18:29:40.843073
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alert_acknowledgements",
        sa.Column("alert_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("acknowledged_by", sa.String(length=128), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("alert_id"),
    )


def downgrade() -> None:
    # edgeloop does not downgrade a database: restore the backup taken before the upgrade.
    raise NotImplementedError("restore the backup taken before `edgeloop db upgrade`")
