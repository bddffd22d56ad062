"""registration attempts

Revision ID: 0006
Revises: 0005

A registration that fails for a reason of the server's (signing, the database) is counted on the
job and retried with a backoff; after ``EDGELOOP_REGISTER_ATTEMPTS`` the job fails, so the line
can train again. Jobs already in the table have had no failed registration counted: 0.
Create Date: 2026-12-07 18:29:59.748942
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("register_attempts", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    # edgeloop does not downgrade a database: restore the backup taken before the upgrade.
    raise NotImplementedError("restore the backup taken before `edgeloop db upgrade`")
