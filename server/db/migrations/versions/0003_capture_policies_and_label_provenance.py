"""capture policies and label provenance

Adds ``capture_policies`` (the signed capture policies issued per line and device group) and the
label provenance of ``samples`` (``origin``, ``label_source``, ``labelled_by``,
``labelled_at``); ``true_label`` becomes nullable (unlabelled samples wait in the labelling
queue). Every sample stored before this revision was captured with the device's ground truth:
its ``label_source`` is set to ``device``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 15:20:12.412498
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "capture_policies",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("model_line", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(length=128), nullable=False),
        sa.Column("raised", sa.Boolean(), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("envelope", sa.JSON(), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("capture_policies", schema=None) as batch_op:
        batch_op.create_index(
            "ix_capture_policies_line_group", ["model_line", "group_name", "id"], unique=False
        )

    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("origin", sa.String(length=16), server_default="device", nullable=False)
        )
        batch_op.add_column(sa.Column("label_source", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("labelled_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column("true_label", existing_type=sa.INTEGER(), nullable=True)
    op.execute("UPDATE samples SET label_source = 'device' WHERE label_source IS NULL")


def downgrade() -> None:
    # edgeloop does not downgrade a database: restore the backup taken before the upgrade.
    raise NotImplementedError("restore the backup taken before `edgeloop db upgrade`")
