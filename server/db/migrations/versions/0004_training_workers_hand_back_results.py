"""training workers hand back results

Revision ID: 0004
Revises: 0003

Training moves off the server (``edgeloop worker``): a worker records its results' artifact shas
on the job and sets it ``trained``; a server registers it. A trained job is still the line's one
active job, so the partial unique index takes in the new state.
Create Date: 2026-12-07 15:17:40.737827
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE_JOB = "status IN ('queued', 'running', 'trained')"


def upgrade() -> None:
    with op.batch_alter_table("model_lines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_pool_sha256", sa.String(length=64), nullable=True))

    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trained_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("result_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("result_size", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("result_weights_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("result_report_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("result_dataset_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("result_base_sha256", sa.String(length=64), nullable=True))

    # Written by hand (autogenerate does not compare an index's WHERE clause).
    op.drop_index("uq_jobs_one_active_per_line", table_name="training_jobs")
    op.create_index(
        "uq_jobs_one_active_per_line",
        "training_jobs",
        ["model_line"],
        unique=True,
        postgresql_where=sa.text(ACTIVE_JOB),
        sqlite_where=sa.text(ACTIVE_JOB),
    )


def downgrade() -> None:
    # edgeloop does not downgrade a database: restore the backup taken before the upgrade.
    raise NotImplementedError("restore the backup taken before `edgeloop db upgrade`")
