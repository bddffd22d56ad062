"""Baseline: the schema of edgeloop's last release made without migrations (commit 7ee107e).

Revision ID: 0001
Revises:
Create Date: 2026-12-07

A database made by that release's ``create_all`` (or an older edgeloop's) has these tables but no
``alembic_version``: ``server.db.migrate.upgrade`` adopts it by running this revision with
``ADOPT_LEGACY`` set, and then only what the database lacks is created: tables, indexes, the two
nullable columns added after their tables' first release, the audit log's triggers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

from server.db.migrate import ADOPT_LEGACY

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Nullable columns added after their tables' first release (create_all added them on start).
ADDED_COLUMNS = (
    ("device_events", "dropped", sa.JSON()),
    ("device_credentials", "enroll_secret_hash", sa.String(length=64)),
)


def upgrade() -> None:
    have = _existing()
    if "audit_log" not in have:
        op.create_table(
            "audit_log",
            sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
            sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
            sa.Column("actor", sa.String(length=128), nullable=False),
            sa.Column("action", sa.String(length=64), nullable=False),
            sa.Column("subject", sa.String(length=256), nullable=False),
            sa.Column("details", sa.JSON(), nullable=False),
            sa.Column("prev_hash", sa.String(length=64), nullable=False),
            sa.Column("hash", sa.String(length=64), nullable=False),
            sa.PrimaryKeyConstraint("seq"),
        )
    _index(have, "audit_log", "ix_audit_log_action", ["action"])

    if "class_metrics" not in have:
        op.create_table(
            "class_metrics",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("model_version", sa.Integer(), nullable=False),
            sa.Column("source", sa.String(length=16), nullable=False),
            sa.Column("label", sa.Integer(), nullable=False),
            sa.Column("support", sa.BigInteger(), nullable=False),
            sa.Column("correct", sa.BigInteger(), nullable=False),
            sa.Column("predicted", sa.BigInteger(), nullable=False),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "class_metrics", "ix_class_metrics_device_id", ["device_id"])
    _index(
        have,
        "class_metrics",
        "ix_class_metrics_line_version",
        ["model_line", "model_version", "source"],
    )

    if "dataset_versions" not in have:
        op.create_table(
            "dataset_versions",
            sa.Column("version", sa.String(length=64), nullable=False),
            sa.Column("base", sa.Text(), nullable=False),
            sa.Column("base_sha256", sa.String(length=64), nullable=False),
            sa.Column("field_fraction", sa.Float(), nullable=False),
            sa.Column("sample_count", sa.Integer(), nullable=False),
            sa.Column("train_count", sa.Integer(), nullable=False),
            sa.Column("field_count", sa.Integer(), nullable=False),
            sa.Column("rejected_count", sa.Integer(), nullable=False),
            sa.Column("manifest", sa.JSON(), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("job_id", sa.BigInteger(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("version"),
        )
    if "device_events" not in have:
        op.create_table(
            "device_events",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("ts", sa.Float(), nullable=False),
            sa.Column("state", sa.String(length=32), nullable=False),
            sa.Column("model_version", sa.Integer(), nullable=True),
            sa.Column("release", sa.Integer(), nullable=True),
            sa.Column("rollout_id", sa.BigInteger(), nullable=True),
            sa.Column("target_release", sa.Integer(), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("dropped", sa.JSON(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "device_events", "ix_device_events_device_id", ["device_id"])

    if "device_metrics" not in have:
        op.create_table(
            "device_metrics",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("model_version", sa.Integer(), nullable=False),
            sa.Column("rollout_id", sa.BigInteger(), nullable=True),
            sa.Column("ts", sa.Float(), nullable=False),
            sa.Column("window_s", sa.Float(), nullable=False),
            sa.Column("inferences", sa.BigInteger(), nullable=False),
            sa.Column("errors", sa.BigInteger(), nullable=False),
            sa.Column("labelled", sa.BigInteger(), nullable=False),
            sa.Column("correct", sa.BigInteger(), nullable=False),
            sa.Column("p50", sa.Float(), nullable=False),
            sa.Column("p95", sa.Float(), nullable=False),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "device_metrics", "ix_device_metrics_device_id", ["device_id"])
    _index(have, "device_metrics", "ix_metrics_line_version", ["model_line", "model_version"])

    if "enrollment_tokens" not in have:
        op.create_table(
            "enrollment_tokens",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("token_hash", sa.String(length=64), nullable=False),
            sa.Column("max_uses", sa.Integer(), nullable=False),
            sa.Column("uses", sa.Integer(), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=True),
            sa.Column("groups", sa.JSON(), nullable=False),
            sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("created_by", sa.String(length=128), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("token_hash"),
        )
    if "model_lines" not in have:
        op.create_table(
            "model_lines",
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("trainer", sa.String(length=32), nullable=False),
            sa.Column("hyperparams", sa.JSON(), nullable=False),
            sa.Column("input_spec", sa.JSON(), nullable=False),
            sa.Column("labels", sa.JSON(), nullable=False),
            sa.Column("retrain_threshold", sa.Integer(), nullable=False),
            sa.Column("champion_version", sa.Integer(), nullable=True),
            sa.Column("current_release", sa.Integer(), nullable=True),
            sa.Column("last_release", sa.Integer(), nullable=False),
            sa.Column("new_samples", sa.Integer(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("training_config", sa.JSON(), nullable=False),
            sa.Column("schedule_s", sa.Float(), nullable=True),
            sa.Column("last_job_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("name"),
        )
    if "operator_tokens" not in have:
        op.create_table(
            "operator_tokens",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("name", sa.String(length=128), nullable=False),
            sa.Column("role", sa.String(length=16), nullable=False),
            sa.Column("token_hash", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("created_by", sa.String(length=128), nullable=False),
            sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("token_hash"),
        )
    if "refused_reports" not in have:
        op.create_table(
            "refused_reports",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("kind", sa.String(length=16), nullable=False),
            sa.Column("reason", sa.Text(), nullable=False),
            sa.Column("excerpt", sa.Text(), nullable=False),
            sa.Column("size", sa.Integer(), nullable=True),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "refused_reports", "ix_refused_reports_device", ["device_id", "id"])

    if "sample_upload_counts" not in have:
        op.create_table(
            "sample_upload_counts",
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("day", sa.String(length=10), nullable=False),
            sa.Column("count", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint("device_id", "day"),
        )
    if "shadow_metrics" not in have:
        op.create_table(
            "shadow_metrics",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("champion_version", sa.Integer(), nullable=False),
            sa.Column("challenger_version", sa.Integer(), nullable=False),
            sa.Column("compared", sa.BigInteger(), nullable=False),
            sa.Column("agreed", sa.BigInteger(), nullable=False),
            sa.Column("labelled", sa.BigInteger(), nullable=False),
            sa.Column("champion_correct", sa.BigInteger(), nullable=False),
            sa.Column("challenger_correct", sa.BigInteger(), nullable=False),
            sa.Column("errors", sa.BigInteger(), nullable=False),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "shadow_metrics", "ix_shadow_metrics_device_id", ["device_id"])
    _index(
        have,
        "shadow_metrics",
        "ix_shadow_metrics_line_version",
        ["model_line", "challenger_version"],
    )

    if "devices" not in have:
        op.create_table(
            "devices",
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("hardware", sa.String(length=128), nullable=True),
            sa.Column("groups", sa.JSON(), nullable=False),
            sa.Column("agent_version", sa.String(length=64), nullable=True),
            sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
            sa.Column("state", sa.String(length=32), nullable=True),
            sa.Column("model_version", sa.Integer(), nullable=True),
            sa.Column("release", sa.Integer(), nullable=True),
            sa.Column("last_reason", sa.Text(), nullable=True),
            sa.ForeignKeyConstraint(
                ["model_line"],
                ["model_lines.name"],
            ),
            sa.PrimaryKeyConstraint("device_id"),
        )
    _index(have, "devices", "ix_devices_model_line", ["model_line"])

    if "model_versions" not in have:
        op.create_table(
            "model_versions",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("line", sa.String(length=64), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("sha256", sa.String(length=64), nullable=True),
            sa.Column("size", sa.BigInteger(), nullable=True),
            sa.Column("parent_version", sa.Integer(), nullable=True),
            sa.Column("dataset_version", sa.String(length=128), nullable=True),
            sa.Column("trainer", sa.String(length=32), nullable=False),
            sa.Column("hyperparams", sa.JSON(), nullable=False),
            sa.Column("metrics", sa.JSON(), nullable=False),
            sa.Column("report", sa.JSON(), nullable=False),
            sa.Column("sample_count", sa.Integer(), nullable=False),
            sa.Column("job_id", sa.BigInteger(), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("weights_sha256", sa.String(length=64), nullable=True),
            sa.ForeignKeyConstraint(
                ["line"],
                ["model_lines.name"],
            ),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("line", "version"),
        )
    if "releases" not in have:
        op.create_table(
            "releases",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("line", sa.String(length=64), nullable=False),
            sa.Column("release", sa.Integer(), nullable=False),
            sa.Column("model_version", sa.Integer(), nullable=False),
            sa.Column("sha256", sa.String(length=64), nullable=False),
            sa.Column("envelope", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(
                ["line"],
                ["model_lines.name"],
            ),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("line", "release"),
        )
    if "rollouts" not in have:
        op.create_table(
            "rollouts",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("from_version", sa.Integer(), nullable=True),
            sa.Column("to_version", sa.Integer(), nullable=False),
            sa.Column("release", sa.Integer(), nullable=True),
            sa.Column("rollback_release", sa.Integer(), nullable=True),
            sa.Column("state", sa.String(length=24), nullable=False),
            sa.Column("paused_state", sa.String(length=24), nullable=True),
            sa.Column("stage", sa.Integer(), nullable=False),
            sa.Column("canary_percent", sa.Integer(), nullable=False),
            sa.Column("created_by", sa.String(length=128), nullable=False),
            sa.Column("approved_by", sa.String(length=128), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("stage_started_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("full_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("gates", sa.JSON(), nullable=True),
            sa.Column("plan", sa.JSON(), nullable=True),
            sa.Column("targeting", sa.JSON(), nullable=True),
            sa.ForeignKeyConstraint(
                ["model_line"],
                ["model_lines.name"],
            ),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "rollouts", "ix_rollouts_line_state", ["model_line", "state"])

    if "training_jobs" not in have:
        op.create_table(
            "training_jobs",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("trigger", sa.String(length=16), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("result_version", sa.Integer(), nullable=True),
            sa.Column("sample_count", sa.Integer(), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("max_attempts", sa.Integer(), nullable=False),
            sa.Column("claimed_by", sa.String(length=128), nullable=True),
            sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
            sa.Column("dataset_version", sa.String(length=64), nullable=True),
            sa.ForeignKeyConstraint(
                ["model_line"],
                ["model_lines.name"],
            ),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "training_jobs", "ix_jobs_line_status", ["model_line", "status"])
    _index(
        have,
        "training_jobs",
        "uq_jobs_one_active_per_line",
        ["model_line"],
        unique=True,
        postgresql_where=sa.text("status IN ('queued', 'running')"),
        sqlite_where=sa.text("status IN ('queued', 'running')"),
    )

    if "device_credentials" not in have:
        op.create_table(
            "device_credentials",
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("credential_hash", sa.String(length=64), nullable=False),
            sa.Column("mqtt_hash", sa.String(length=256), nullable=False),
            sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column(
                "enrollment_token_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            ),
            sa.Column("allowed_line", sa.String(length=64), nullable=True),
            sa.Column("allowed_groups", sa.JSON(), nullable=False),
            sa.Column("enroll_secret_hash", sa.String(length=64), nullable=True),
            sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
            sa.ForeignKeyConstraint(
                ["device_id"],
                ["devices.device_id"],
            ),
            sa.PrimaryKeyConstraint("device_id"),
            sa.UniqueConstraint("credential_hash"),
        )
    if "device_health" not in have:
        op.create_table(
            "device_health",
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("failures", sa.Integer(), nullable=False),
            sa.Column("quarantined_until", sa.DateTime(timezone=True), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(
                ["device_id"],
                ["devices.device_id"],
            ),
            sa.PrimaryKeyConstraint("device_id"),
        )
    if "rollout_devices" not in have:
        op.create_table(
            "rollout_devices",
            sa.Column(
                "rollout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
            ),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("stage", sa.Integer(), nullable=False),
            sa.Column("state", sa.String(length=32), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("installed_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("failures", sa.Integer(), nullable=False),
            sa.ForeignKeyConstraint(
                ["device_id"],
                ["devices.device_id"],
            ),
            sa.ForeignKeyConstraint(
                ["rollout_id"],
                ["rollouts.id"],
            ),
            sa.PrimaryKeyConstraint("rollout_id", "device_id"),
        )
    if "rollout_events" not in have:
        op.create_table(
            "rollout_events",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column(
                "rollout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
            ),
            sa.Column("device_id", sa.String(length=128), nullable=True),
            sa.Column("wave", sa.Integer(), nullable=True),
            sa.Column("state", sa.String(length=32), nullable=False),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("by", sa.String(length=128), nullable=True),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(
                ["rollout_id"],
                ["rollouts.id"],
            ),
            sa.PrimaryKeyConstraint("id"),
        )
    _index(have, "rollout_events", "ix_rollout_events_rollout", ["rollout_id", "device_id"])

    if "rollout_waves" not in have:
        op.create_table(
            "rollout_waves",
            sa.Column(
                "rollout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
            ),
            sa.Column("wave", sa.Integer(), nullable=False),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("started_by", sa.String(length=128), nullable=False),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("outcome", sa.String(length=24), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("error_override", sa.Boolean(), nullable=False),
            sa.ForeignKeyConstraint(
                ["rollout_id"],
                ["rollouts.id"],
            ),
            sa.PrimaryKeyConstraint("rollout_id", "wave"),
        )
    if "samples" not in have:
        op.create_table(
            "samples",
            sa.Column("sample_id", sa.String(length=64), nullable=False),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("model_version", sa.Integer(), nullable=False),
            sa.Column("input", sa.LargeBinary(), nullable=False),
            sa.Column("true_label", sa.Integer(), nullable=False),
            sa.Column("predicted_label", sa.Integer(), nullable=False),
            sa.Column("confidence", sa.Float(), nullable=False),
            sa.Column("captured_at", sa.Float(), nullable=False),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("content_sha256", sa.String(length=64), nullable=True),
            sa.ForeignKeyConstraint(
                ["device_id"],
                ["devices.device_id"],
            ),
            sa.ForeignKeyConstraint(
                ["model_line"],
                ["model_lines.name"],
            ),
            sa.PrimaryKeyConstraint("sample_id"),
        )
    _index(have, "samples", "ix_samples_device", ["device_id"])
    _index(have, "samples", "ix_samples_line", ["model_line"])
    _index(
        have, "samples", "uq_samples_line_content", ["model_line", "content_sha256"], unique=True
    )

    if "dataset_samples" not in have:
        op.create_table(
            "dataset_samples",
            sa.Column("dataset_version", sa.String(length=64), nullable=False),
            sa.Column("sample_id", sa.String(length=64), nullable=False),
            sa.Column("role", sa.String(length=8), nullable=False),
            sa.ForeignKeyConstraint(
                ["dataset_version"],
                ["dataset_versions.version"],
            ),
            sa.ForeignKeyConstraint(
                ["sample_id"],
                ["samples.sample_id"],
            ),
            sa.PrimaryKeyConstraint("dataset_version", "sample_id"),
        )
    _index(have, "dataset_samples", "ix_dataset_samples_sample", ["sample_id"])

    if "sample_quarantine" not in have:
        op.create_table(
            "sample_quarantine",
            sa.Column("sample_id", sa.String(length=64), nullable=False),
            sa.Column("model_line", sa.String(length=64), nullable=False),
            sa.Column("device_id", sa.String(length=128), nullable=False),
            sa.Column("check", sa.String(length=32), nullable=False),
            sa.Column("reason", sa.Text(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("released_by", sa.String(length=128), nullable=True),
            sa.ForeignKeyConstraint(
                ["sample_id"],
                ["samples.sample_id"],
            ),
            sa.PrimaryKeyConstraint("sample_id"),
        )
    _index(have, "sample_quarantine", "ix_sample_quarantine_device_id", ["device_id"])
    _index(have, "sample_quarantine", "ix_sample_quarantine_model_line", ["model_line"])

    _add_columns(have)
    _audit_log_append_only()


def downgrade() -> None:
    # edgeloop does not downgrade a database: restore the backup taken before the upgrade.
    raise NotImplementedError("restore the backup taken before `edgeloop db upgrade`")


def _existing() -> dict[str, set[str]]:
    """Adopting a database made before migrations: its tables, each with its index names.
    Otherwise (an empty database) nothing, and every table is created."""
    if not context.config.attributes.get(ADOPT_LEGACY):
        return {}
    inspector = sa.inspect(op.get_bind())
    return {
        name: {str(index["name"]) for index in inspector.get_indexes(name)}
        for name in inspector.get_table_names()
    }


def _index(have: dict[str, set[str]], table: str, name: str, columns: list[str], **kw: Any) -> None:
    if name not in have.get(table, ()):
        op.create_index(name, table, columns, **kw)


def _add_columns(have: dict[str, set[str]]) -> None:
    """The nullable columns an adopted database's older tables may lack."""
    inspector = sa.inspect(op.get_bind())
    for table, column, type_ in ADDED_COLUMNS:
        if table in have and column not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, sa.Column(column, type_, nullable=True))


def _audit_log_append_only() -> None:
    """Triggers that refuse UPDATE and DELETE on audit_log (unless a superuser disables them)."""
    if op.get_bind().dialect.name == "sqlite":
        for verb, name in (("UPDATE", "audit_log_no_update"), ("DELETE", "audit_log_no_delete")):
            op.execute(
                f"CREATE TRIGGER IF NOT EXISTS {name} BEFORE {verb} ON audit_log "
                f"BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: {verb} refused'); END"
            )
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION USING MESSAGE = 'audit_log is append-only: ' || TG_OP || ' refused';
        END
        $$ LANGUAGE plpgsql
        """
    )
    present = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM pg_trigger WHERE tgname = 'audit_log_append_only' "
        "AND tgrelid = 'audit_log'::regclass"
    )
    if present.first() is None:
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
