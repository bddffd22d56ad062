"""Schema migrations (``server.db.migrate``, ``edgeloop db upgrade`` and ``db current``) on real
SQLite and PostgreSQL.

- A database made by the last release without migrations (7ee107e: ``fixtures/``, the DDL its own
  ``create_all`` ran), with rows in every table, is adopted by ``edgeloop db upgrade``: every row
  is still there, the server starts on it, and its schema is the one an empty database gets.
  An older one (a table, an index, the two added columns and the audit triggers missing) gains
  what it lacks; one that differs otherwise is refused and left exactly as it was.
- The models and the migrations agree: Alembic's autogenerate diff is empty on both backends.
- The server refuses an empty, a pre-migration and a behind database, naming the command; a later
  revision (one that rebuilds a SQLite table with children) runs on a filled database.
- Two upgrades started together create the schema once; the commands, run from edgeloop's wheel,
  need no working directory; scripts/new_migration.py writes the next revision.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from server.cli.main import app as cli_app
from server.core.errors import SchemaError
from server.db import audit, migrate
from server.db.base import Base
from server.db.engine import make_engine
from server.main import create_app
from tests.conftest import PG_URL, REPO, write_key_pair
from tests.server.conftest import authed_client, make_settings

RELEASE = "7ee107e"  # the last release made without migrations (scripts/schema_fixture.py)
FIXTURES = Path(__file__).with_name("fixtures")
T = datetime(2026, 11, 30, 9, 15, 0, 123456, tzinfo=UTC)
DIGITS = [str(i) for i in range(10)]


def _audit_rows() -> list[dict[str, Any]]:
    """Two records chained as the server writes them (``edgeloop audit verify`` accepts them)."""
    rows: list[dict[str, Any]] = []
    prev = audit.GENESIS_HASH
    records: list[tuple[str, str, dict[str, Any]]] = [
        ("release.sign", "digits/1", {"model_version": 1, "sha256": "ab" * 32}),
        ("rollout.approve", "rollout/1", {"to_version": 2}),
    ]
    for seq, (action, subject, details) in enumerate(records, start=1):
        digest = audit.record_hash(
            seq=seq,
            ts=T,
            actor="alice",
            action=action,
            subject=subject,
            details=details,
            prev_hash=prev,
        )
        rows.append(
            {
                "seq": seq,
                "ts": T,
                "actor": "alice",
                "action": action,
                "subject": subject,
                "details": details,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    return rows


# One or more realistic rows for every table of the release, parents before children. Serial ids
# are left to the database (they come out 1, 2, ... as listed here).
ROWS: dict[str, list[dict[str, Any]]] = {
    "model_lines": [
        {
            "name": "digits",
            "trainer": "sklearn-mlp",
            "hyperparams": {"hidden_layer_sizes": [64], "max_iter": 300},
            "input_spec": {"name": "input", "shape": [-1, 64], "dtype": "float32"},
            "labels": DIGITS,
            "retrain_threshold": 200,
            "champion_version": 1,
            "current_release": 1,
            "last_release": 2,
            "new_samples": 2,
            "created_at": T,
            "training_config": {"trainer": "sklearn-mlp", "schedule_s": None},
            "schedule_s": 3600.0,
            "last_job_at": T,
        }
    ],
    "training_jobs": [
        {
            "id": 1,
            "model_line": "digits",
            "status": "succeeded",
            "trigger": "initial",
            "created_at": T,
            "started_at": T,
            "finished_at": T + timedelta(minutes=2),
            "error": None,
            "result_version": 1,
            "sample_count": 1797,
            "attempts": 1,
            "max_attempts": 3,
            "claimed_by": "edgeloop-server-host-8000",
            "heartbeat_at": T,
            "not_before": None,
            "dataset_version": "e1" * 32,
        },
        {
            "id": 2,
            "model_line": "digits",
            "status": "queued",
            "trigger": "threshold",
            "created_at": T,
            "started_at": None,
            "finished_at": None,
            "error": None,
            "result_version": None,
            "sample_count": None,
            "attempts": 0,
            "max_attempts": 3,
            "claimed_by": None,
            "heartbeat_at": None,
            "not_before": T + timedelta(seconds=30),
            "dataset_version": None,
        },
    ],
    "model_versions": [
        {
            "id": 1,
            "line": "digits",
            "version": 1,
            "status": "champion",
            "sha256": "ab" * 32,
            "size": 40960,
            "parent_version": None,
            "dataset_version": "e1" * 32,
            "trainer": "sklearn-mlp",
            "hyperparams": {"hidden_layer_sizes": [64]},
            "metrics": {"challenger": {"golden_accuracy": 0.93}},
            "report": {"passed": True, "checks": []},
            "sample_count": 1797,
            "job_id": 1,
            "reason": None,
            "created_at": T,
            "weights_sha256": "cd" * 32,
        },
        {
            "id": 2,
            "line": "digits",
            "version": 2,
            "status": "candidate",
            "sha256": "ef" * 32,
            "size": 40960,
            "parent_version": 1,
            "dataset_version": "e1" * 32,
            "trainer": "sklearn-mlp",
            "hyperparams": {"hidden_layer_sizes": [64]},
            "metrics": {"challenger": {"golden_accuracy": 0.95}},
            "report": {"passed": True},
            "sample_count": 1799,
            "job_id": 1,
            "reason": "drift on the field set",
            "created_at": T,
            "weights_sha256": None,
        },
    ],
    "releases": [
        {
            "id": i,
            "line": "digits",
            "release": i,
            "model_version": i,
            "sha256": sha * 32,
            "envelope": {"payloadType": "application/vnd.edgeloop.manifest+json", "sig": [i]},
            "created_at": T,
        }
        for i, sha in ((1, "ab"), (2, "ef"))
    ],
    "dataset_versions": [
        {
            "version": "e1" * 32,
            "base": "digits-train",
            "base_sha256": "f0" * 32,
            "field_fraction": 0.2,
            "sample_count": 1,
            "train_count": 1,
            "field_count": 0,
            "rejected_count": 0,
            "manifest": {"dataset_version": "e1" * 32, "samples": {"train_ids": ["s-1"]}},
            "model_line": "digits",
            "job_id": 1,
            "created_at": T,
        }
    ],
    "devices": [
        {
            "device_id": "cam-1",
            "model_line": "digits",
            "hardware": "raspberry-pi-4",
            "groups": ["north", "canary"],
            "agent_version": "0.1.0",
            "registered_at": T,
            "last_seen": T + timedelta(minutes=5),
            "state": "idle",
            "model_version": 1,
            "release": 1,
            "last_reason": None,
        }
    ],
    "operator_tokens": [
        {
            "id": 1,
            "name": "alice",
            "role": "approver",
            "token_hash": "33" * 32,
            "created_at": T,
            "created_by": "admin",
            "revoked_at": None,
        }
    ],
    "enrollment_tokens": [
        {
            "id": 1,
            "token_hash": "44" * 32,
            "max_uses": 50,
            "uses": 1,
            "model_line": "digits",
            "groups": ["north"],
            "expires_at": T + timedelta(days=30),
            "created_at": T,
            "created_by": "alice",
        }
    ],
    "device_credentials": [
        {
            "device_id": "cam-1",
            "credential_hash": "11" * 32,
            "mqtt_hash": "$7$101$c2FsdA==$aGFzaA==",
            "issued_at": T,
            "enrollment_token_id": 1,
            "allowed_line": "digits",
            "allowed_groups": ["north"],
            "enroll_secret_hash": "22" * 32,
            "revoked_at": None,
        }
    ],
    "device_health": [
        {
            "device_id": "cam-1",
            "failures": 1,
            "quarantined_until": None,
            "reason": "install failed once: disk full",
            "updated_at": T,
        }
    ],
    "device_metrics": [
        {
            "id": 1,
            "device_id": "cam-1",
            "model_line": "digits",
            "model_version": 1,
            "rollout_id": 1,
            "ts": 1764493200.5,
            "window_s": 10.0,
            "inferences": 120,
            "errors": 0,
            "labelled": 12,
            "correct": 11,
            "p50": 1.25,
            "p95": 3.5,
            "received_at": T,
        }
    ],
    "device_events": [
        {
            "id": 1,
            "device_id": "cam-1",
            "ts": 1764493200.5,
            "state": "idle",
            "model_version": 1,
            "release": 1,
            "rollout_id": None,
            "target_release": 1,
            "reason": None,
            "received_at": T,
            "dropped": ["battery_mv"],
        }
    ],
    "class_metrics": [
        {
            "id": 1,
            "device_id": "cam-1",
            "model_line": "digits",
            "model_version": 1,
            "source": "field",
            "label": 3,
            "support": 10,
            "correct": 9,
            "predicted": 11,
            "received_at": T,
        }
    ],
    "shadow_metrics": [
        {
            "id": 1,
            "device_id": "cam-1",
            "model_line": "digits",
            "champion_version": 1,
            "challenger_version": 2,
            "compared": 100,
            "agreed": 95,
            "labelled": 10,
            "champion_correct": 8,
            "challenger_correct": 9,
            "errors": 0,
            "received_at": T,
        }
    ],
    "refused_reports": [
        {
            "id": 1,
            "device_id": "cam-1",
            "kind": "metrics",
            "reason": "p95: not a number",
            "excerpt": '{"p95": "fast"}',
            "size": 15,
            "received_at": T,
        }
    ],
    "sample_upload_counts": [{"device_id": "cam-1", "day": "2026-11-30", "count": 2}],
    "samples": [
        {
            "sample_id": f"s-{i}",
            "device_id": "cam-1",
            "model_line": "digits",
            "model_version": 1,
            "input": bytes(range(i, 64 + i)),
            "true_label": 3,
            "predicted_label": 5 if i == 1 else 3,
            "confidence": 0.41,
            "captured_at": 1764493100.25,
            "received_at": T,
            "content_sha256": f"{i}5" * 32,
        }
        for i in (1, 2)
    ],
    "dataset_samples": [{"dataset_version": "e1" * 32, "sample_id": "s-1", "role": "train"}],
    "sample_quarantine": [
        {
            "sample_id": "s-2",
            "model_line": "digits",
            "device_id": "cam-1",
            "check": "label_outlier",
            "reason": "label 3 far from the class centroid",
            "created_at": T,
            "released_at": None,
            "released_by": None,
        }
    ],
    "rollouts": [
        {
            "id": 1,
            "model_line": "digits",
            "from_version": 1,
            "to_version": 2,
            "release": 2,
            "rollback_release": 1,
            "state": "canary",
            "paused_state": None,
            "stage": 1,
            "canary_percent": 10,
            "created_by": "alice",
            "approved_by": "bob",
            "created_at": T,
            "approved_at": T,
            "stage_started_at": T,
            "full_at": None,
            "paused_at": None,
            "finished_at": None,
            "reason": None,
            "gates": {"max_error_rate": 0.05},
            "plan": {"waves": [10, 50, 100]},
            "targeting": {"groups": ["north"]},
        }
    ],
    "rollout_devices": [
        {
            "rollout_id": 1,
            "device_id": "cam-1",
            "stage": 1,
            "state": "installed",
            "updated_at": T,
            "installed_at": T,
            "reason": None,
            "notified_at": T,
            "attempts": 1,
            "failures": 0,
        }
    ],
    "rollout_events": [
        {
            "id": 1,
            "rollout_id": 1,
            "device_id": "cam-1",
            "wave": 1,
            "state": "installed",
            "reason": None,
            "by": None,
            "at": T,
        }
    ],
    "rollout_waves": [
        {
            "rollout_id": 1,
            "wave": 1,
            "started_at": T,
            "started_by": "bob",
            "finished_at": None,
            "outcome": None,
            "reason": None,
            "error_override": False,
        }
    ],
    "audit_log": _audit_rows(),
}

# What an older edgeloop's database lacked: built from the release's by removing these.
OLDER_MISSING_TABLE = "refused_reports"
OLDER_MISSING_COLUMNS = (("device_events", "dropped"), ("device_credentials", "enroll_secret_hash"))
OLDER_MISSING_INDEX = ("samples", "ix_samples_device")


# ---------------------------------------------------------------- helpers


@pytest.fixture
def other_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A second empty database on the same backend as ``db_url``."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/other.db"
        return
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"edgeloop_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield f"{PG_URL.rpartition('/')[0]}/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def run_sql(url: str, *statements: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


def load_release(url: str) -> None:
    """The release's schema, from the DDL its create_all ran (no alembic_version table)."""
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    script = (FIXTURES / f"schema-{RELEASE}.{dialect}.sql").read_text()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            driver: Any = conn.connection.driver_connection
            if dialect == "sqlite":
                driver.executescript(script)
            else:
                driver.execute(script)
                driver.commit()
    finally:
        engine.dispose()


def make_older(url: str) -> None:
    """Turn the release's schema into an older edgeloop's (what create_all added since)."""
    table, index = OLDER_MISSING_INDEX
    sqlite = url.startswith("sqlite")
    run_sql(
        url,
        f"DROP TABLE {OLDER_MISSING_TABLE}",
        *(f"ALTER TABLE {t} DROP COLUMN {c}" for t, c in OLDER_MISSING_COLUMNS),
        f"DROP INDEX {index}",
        *(
            ["DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete"]
            if sqlite
            else ["DROP TRIGGER audit_log_append_only ON audit_log"]
        ),
    )


def _stored(value: Any, sqlite: bool) -> Any:
    return (
        value.astimezone(UTC).replace(tzinfo=None)
        if sqlite and isinstance(value, datetime)
        else value
    )


def _read(value: Any) -> Any:
    """A value as read back, comparable across backends (datetimes as naive UTC)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def fill(url: str, *, skip_tables: tuple[str, ...] = (), skip_columns: tuple = ()) -> None:
    """Insert ``ROWS`` through the database's own (reflected) tables, as the release stored them."""
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    meta = sa.MetaData()
    try:
        with engine.begin() as conn:
            meta.reflect(conn)
            for name, rows in ROWS.items():
                if name in skip_tables:
                    continue
                table = meta.tables[name]
                serial = [c.name for c in table.primary_key.columns] == [
                    "id"
                ] and name != "audit_log"
                for row in rows:
                    values = {
                        k: _stored(v, sqlite)
                        for k, v in row.items()
                        if (name, k) not in skip_columns and not (serial and k == "id")
                    }
                    conn.execute(table.insert().values(values))
    finally:
        engine.dispose()


# Columns added after the baseline with a server default: (table, column) -> value.
SERVER_DEFAULTS = {("samples", "origin"): "device", ("training_jobs", "register_attempts"): 0}
# Columns a migration after the baseline fills in the rows it finds.
# 0003: every sample stored before it was captured with the device's ground truth.
FILLED_BY_MIGRATIONS = {**SERVER_DEFAULTS, ("samples", "label_source"): "device"}


def at_head(
    rows: dict[str, list[dict[str, Any]]], *, migrated: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """The release's rows as a database at this edgeloop's head holds them: what the migrations
    after the baseline added is there too, tables empty and nullable columns null, or what the
    migrations filled in (``migrated``: the rows were there before the upgrade) or the server
    default (rows written at the head by a writer that did not know the column)."""
    added = FILLED_BY_MIGRATIONS if migrated else SERVER_DEFAULTS
    return {
        name: [
            {c.name: row.get(c.name, added.get((name, c.name))) for c in table.columns}
            for row in rows.get(name, [])
        ]
        for name, table in Base.metadata.tables.items()
    }


def stored_rows(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every edgeloop table, by primary key, values as ``_read`` gives them."""
    engine = make_engine(url)
    meta = sa.MetaData()
    try:
        with engine.connect() as conn:
            meta.reflect(conn)
            out = {}
            for name, table in meta.tables.items():
                if name == "alembic_version":
                    continue
                query = sa.select(table).order_by(*table.primary_key.columns)
                out[name] = [
                    {k: _read(v) for k, v in row.items()} for row in conn.execute(query).mappings()
                ]
            return out
    finally:
        engine.dispose()


def expected_rows(
    *, skip_tables: tuple[str, ...] = (), null_columns: tuple = ()
) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [
            {k: None if (name, k) in null_columns else _read(v) for k, v in row.items()}
            for row in rows
        ]
        for name, rows in ROWS.items()
        if name not in skip_tables
    }


def schema_signature(url: str) -> dict[str, Any]:
    """The schema as the inspector reads it (column order aside), with the audit triggers."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            out: dict[str, Any] = {}
            for name in sorted(insp.get_table_names()):
                out[name] = {
                    "columns": sorted(
                        (c["name"], repr(c["type"]), c["nullable"], str(c.get("default")))
                        for c in insp.get_columns(name)
                    ),
                    "pk": insp.get_pk_constraint(name)["constrained_columns"],
                    "fks": sorted(
                        (tuple(f["constrained_columns"]), f["referred_table"])
                        for f in insp.get_foreign_keys(name)
                    ),
                    "indexes": sorted(
                        (
                            i["name"],
                            tuple(i["column_names"]),
                            bool(i["unique"]),
                            sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                        )
                        for i in insp.get_indexes(name)
                    ),
                    "unique": sorted(
                        tuple(u["column_names"]) for u in insp.get_unique_constraints(name)
                    ),
                }
            if engine.dialect.name == "sqlite":
                triggers = conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
                )
            else:
                triggers = conn.exec_driver_sql(
                    "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname"
                )
            out["<triggers>"] = [r[0] for r in triggers]
            return out
    finally:
        engine.dispose()


def cli(*args: str) -> Any:
    return CliRunner().invoke(cli_app, list(args))


def upgrade_with_the_cli(url: str) -> str:
    result = cli("db", "upgrade", "--database-url", url)
    assert result.exit_code == 0, result.output
    return str(result.output)


def refuses_update_and_delete(url: str) -> bool:
    """The audit triggers are there (they fire per row: audit_log must hold some)."""
    for sql in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            run_sql(url, sql)
    return True


def assert_usable_by_the_models(url: str) -> None:
    """The models read every row (types, JSON, timestamps) and the audit chain verifies."""
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            for mapper in Base.registry.mappers:
                name = mapper.persist_selectable.description
                objects = session.scalars(sa.select(mapper.class_)).all()
                assert len(objects) == len(ROWS.get(name, [])), name
            result = audit.verify(session)
            assert result.ok and result.count == 2, result
    finally:
        engine.dispose()


def head() -> str:
    return migrate.head_revision()


# ---------------------------------------------------------------- adopting a release's database


def test_every_table_of_the_release_gets_rows() -> None:
    engine_tables = {
        line.split()[2]
        for line in (FIXTURES / f"schema-{RELEASE}.sqlite.sql").read_text().splitlines()
        if line.startswith("CREATE TABLE ")
    }
    assert engine_tables == set(ROWS)
    assert all(ROWS.values())


def test_a_release_database_upgrades_with_every_row(
    db_url: str, other_url: str, tmp_path: Path, signing_key: Any
) -> None:
    load_release(db_url)
    fill(db_url)
    assert stored_rows(db_url) == expected_rows()
    before = stored_rows(db_url)

    out = upgrade_with_the_cli(db_url)

    assert f"adopted a database made before migrations; now at revision {head()}" in out
    assert before == expected_rows()
    assert stored_rows(db_url) == at_head(before)
    assert_usable_by_the_models(db_url)
    assert refuses_update_and_delete(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert migrate.schema_state(conn).up_to_date
            assert migrate.schema_differences(conn) == []
    finally:
        engine.dispose()
    migrate.upgrade(other_url)
    assert schema_signature(db_url) == schema_signature(other_url)
    # And the server starts on it and serves the old rows.
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    with authed_client(create_app(make_settings(tmp_path, db_url, signing_key_path=priv))) as c:
        assert [d["device_id"] for d in c.get("/api/v1/devices").json()] == ["cam-1"]
        lines = c.get("/api/v1/model-lines").json()
        assert [(m["name"], m["champion_version"]) for m in lines] == [("digits", 1)]


def test_an_older_database_gains_what_it_lacks(db_url: str, other_url: str) -> None:
    load_release(db_url)
    make_older(db_url)
    fill(db_url, skip_tables=(OLDER_MISSING_TABLE,), skip_columns=OLDER_MISSING_COLUMNS)

    result = migrate.upgrade(db_url)

    assert result.before.legacy and result.revision == head()
    assert stored_rows(db_url) == at_head(
        expected_rows(null_columns=OLDER_MISSING_COLUMNS) | {OLDER_MISSING_TABLE: []}
    )
    assert refuses_update_and_delete(db_url)
    migrate.upgrade(other_url)
    assert schema_signature(db_url) == schema_signature(other_url)


def test_a_database_that_differs_otherwise_is_refused_and_left_as_it_was(db_url: str) -> None:
    load_release(db_url)
    run_sql(
        db_url,
        f"DROP TABLE {OLDER_MISSING_TABLE}",
        "ALTER TABLE model_versions DROP COLUMN weights_sha256",  # no edgeloop lacked it
    )
    fill(
        db_url,
        skip_tables=(OLDER_MISSING_TABLE,),
        skip_columns=(("model_versions", "weights_sha256"),),
    )
    before = (schema_signature(db_url), stored_rows(db_url))

    with pytest.raises(SchemaError, match="weights_sha256") as refused:
        migrate.upgrade(db_url)

    assert "nothing was changed" in refused.value.message
    assert (schema_signature(db_url), stored_rows(db_url)) == before  # no table, no version
    result = cli("db", "upgrade", "--database-url", db_url)
    assert result.exit_code == 1 and "weights_sha256" in result.output


# ---------------------------------------------------------------- empty databases, drift


def test_an_empty_database_upgrades_to_head_then_nothing_is_left_to_do(db_url: str) -> None:
    first = migrate.upgrade(db_url)
    assert first.before.empty and first.changed and first.revision == head()
    again = migrate.upgrade(db_url)
    assert not again.changed and again.before.up_to_date
    assert f"already at revision {head()} (head)" in upgrade_with_the_cli(db_url)
    fill(db_url)
    assert stored_rows(db_url) == at_head(expected_rows(), migrated=False)
    assert refuses_update_and_delete(db_url)


def test_the_models_and_the_migrations_agree(db_url: str) -> None:
    """Alembic's autogenerate diff between an upgraded database and the models is empty: a
    model change without its migration (scripts/new_migration.py) fails here."""
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert migrate.schema_differences(conn) == []
    finally:
        engine.dispose()


def test_the_revisions_form_one_line_named_by_number() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_heads() == [head()]
    revisions = list(reversed(list(script.walk_revisions())))
    for number, revision in enumerate(revisions, start=1):
        assert revision.revision == f"{number:04d}"
        assert revision.down_revision == (f"{number - 1:04d}" if number > 1 else None)
        assert Path(str(revision.path)).name.startswith(f"{number:04d}_")


# ---------------------------------------------------------------- the server checks, never migrates

LATER_REVISION = '''"""A later revision for the tests: on SQLite it rebuilds devices, which
four tables reference."""

import sqlalchemy as sa
from alembic import op

revision = "{rev}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.alter_column(
            "agent_version",
            existing_type=sa.String(64),
            type_=sa.String(96),
            existing_nullable=True,
        )
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
'''


@pytest.fixture
def later_migrations(tmp_path: Path) -> Path:
    """This edgeloop's migrations plus one more revision (LATER_REVISION), in a folder of their
    own: what the next edgeloop would ship."""
    folder = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, folder)
    down = head()
    rev = f"{int(down) + 1:04d}"
    (folder / "versions" / f"{rev}_later.py").write_text(LATER_REVISION.format(rev=rev, down=down))
    return folder


def test_the_server_refuses_an_empty_and_a_release_database(db_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "sqlite://").model_copy(update={"database_url": db_url})
    with pytest.raises(SchemaError, match="no edgeloop tables") as refused:
        create_app(settings)
    assert "`edgeloop db upgrade`" in refused.value.message
    load_release(db_url)
    with pytest.raises(SchemaError, match="from before schema migrations") as refused:
        create_app(settings)
    assert "`edgeloop db upgrade`" in refused.value.message


def test_a_later_revision_runs_on_a_filled_database(
    db_url: str, tmp_path: Path, later_migrations: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database at this edgeloop's head, filled; then an edgeloop with one more revision.
    release_head = head()
    migrate.upgrade(db_url)
    fill(db_url)
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", later_migrations)
    later = head()
    assert later != release_head
    settings = make_settings(tmp_path, "sqlite://").model_copy(update={"database_url": db_url})

    with pytest.raises(SchemaError, match=f"at revision {release_head}, behind") as refused:
        create_app(settings)
    assert "`edgeloop db upgrade`" in refused.value.message
    current = cli("db", "current", "--database-url", db_url)
    assert current.exit_code == 1 and current.output.startswith(f"{release_head}:")
    assert "edgeloop db upgrade" in current.output

    out = upgrade_with_the_cli(db_url)

    assert f"upgraded from revision {release_head} to {later}" in out
    assert stored_rows(db_url) == {
        name: [row | {"note": None} for row in rows] if name == "devices" else rows
        for name, rows in at_head(expected_rows(), migrated=False).items()
    }
    engine = make_engine(db_url)
    try:
        columns = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("devices")}
        assert getattr(columns["agent_version"], "length", None) == 96
    finally:
        engine.dispose()
    assert refuses_update_and_delete(db_url)
    now = cli("--json", "db", "current", "--database-url", db_url)
    assert now.exit_code == 0
    assert json.loads(now.output) == {
        "current": later,
        "head": later,
        "up_to_date": True,
        "legacy": False,
    }


def test_db_current_prints_the_revision(db_url: str) -> None:
    empty = cli("db", "current", "--database-url", db_url)
    if db_url.startswith("sqlite"):
        assert empty.exit_code == 1 and "no database file" in empty.output
        run_sql(db_url, "SELECT 1")  # an empty file
        empty = cli("db", "current", "--database-url", db_url)
    assert empty.exit_code == 1 and empty.output.startswith("none: no edgeloop tables")
    migrate.upgrade(db_url)
    done = cli("db", "current", "--database-url", db_url)
    assert (
        done.exit_code == 0
        and done.output.strip() == f"{head()}: schema at revision {head()} (head)"
    )


def test_broker_write_config_needs_the_current_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It reads the database before the server first starts: after `edgeloop db upgrade`."""
    url = f"sqlite:///{tmp_path}/edgeloop.db"
    monkeypatch.setenv("EDGELOOP_DATABASE_URL", url)
    monkeypatch.setenv("EDGELOOP_MQTT_USERNAME", "edgeloop-server")
    monkeypatch.setenv("EDGELOOP_MQTT_PASSWORD", "broker-secret")
    out = tmp_path / "broker"
    refused = cli("broker", "write-config", "--out", str(out))
    assert refused.exit_code == 1 and "`edgeloop db upgrade`" in refused.output
    assert not out.exists()
    migrate.upgrade(url)
    done = cli("broker", "write-config", "--out", str(out))
    assert done.exit_code == 0, done.output
    assert "edgeloop-server:" in (out / "passwd").read_text()


# ---------------------------------------------------------------- concurrency, processes


def test_two_upgrades_at_once_create_the_schema_once(db_url: str) -> None:
    """The second waits for the first's transaction (advisory lock / SQLite's write lock)."""
    start = threading.Barrier(2)
    results: list[migrate.UpgradeResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            results.append(migrate.upgrade(db_url))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert sorted(r.changed for r in results) == [False, True]
    assert all(r.revision == head() for r in results)


def built_wheel(into: Path) -> Path:
    """edgeloop's wheel, built from a copy of the packaged sources (the checkout stays clean),
    unpacked into ``into``; returns ``into``."""
    source = into.parent / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("contract", "server", "device_agent", "training", "firmware_sim"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(into.parent / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (into.parent / "dist").glob("edgeloop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    return into


def test_the_installed_commands_work_from_any_directory(tmp_path: Path) -> None:
    """Real processes running edgeloop's wheel (its migrations are package data, no alembic.ini)
    in an empty working directory: the server refuses the empty database and names the command,
    `edgeloop db upgrade` creates the schema, `db current` shows it."""
    installed = built_wheel(tmp_path / "installed")
    assert (installed / "server/db/migrations/versions/0001_baseline.py").is_file()
    url = f"sqlite:///{tmp_path}/var/edgeloop.db"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(installed),
        "EDGELOOP_DATABASE_URL": url,
        "EDGELOOP_DATA_DIR": str(tmp_path / "var"),
        "EDGELOOP_ENABLE_MQTT": "false",
    }

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    where = run("-c", "import server.db.migrate as m; print(m.MIGRATIONS_DIR)")
    assert where.stdout.strip() == str(installed / "server/db/migrations"), where.stderr
    server = run("-c", "from server.main import run; run()")
    assert server.returncode == 2
    assert "refuses to start" in server.stderr and "`edgeloop db upgrade`" in server.stderr
    upgraded = run("-m", "server.cli.main", "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"created the schema at revision {head()}" in upgraded.stdout
    current = run("-m", "server.cli.main", "db", "current")
    assert current.returncode == 0 and current.stdout.startswith(f"{head()}: ")
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------- writing the next migration


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_migration_writes_the_next_revision_from_the_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/new_migration.py (docs/development.md): a model change becomes revision N+1,
    which brings a database to the changed models; with no change it writes nothing."""
    script = _load_script("new_migration")
    next_number = f"{int(head()) + 1:04d}"
    folder = tmp_path / "ours"
    shutil.copytree(migrate.MIGRATIONS_DIR, folder)
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", folder)
    with pytest.raises(script.NothingToDo):
        script.new_revision("nothing", f"sqlite:///{tmp_path}/a.db")
    changed = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    sa.Table(
        "widgets",
        changed,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device_id", sa.ForeignKey("devices.device_id"), nullable=False),
    )
    changed.tables["devices"].append_column(sa.Column("note", sa.Text, nullable=True))
    monkeypatch.setattr(migrate, "target_metadata", changed)

    path = script.new_revision("add widgets", f"sqlite:///{tmp_path}/b.db")

    assert path.name == f"{next_number}_add_widgets.py" and head() == next_number
    assert "create_table" in path.read_text() and "add_column" in path.read_text()
    fresh = f"sqlite:///{tmp_path}/c.db"
    migrate.upgrade(fresh)
    engine = make_engine(fresh)
    try:
        with engine.connect() as conn:
            assert migrate.schema_differences(conn) == []
    finally:
        engine.dispose()
