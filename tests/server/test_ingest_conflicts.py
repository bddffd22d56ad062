"""Two writers of the same devices' rows (two servers' ingest) on the real PostgreSQL.

A shared subscription hands a device's reports to any server, so two ingest writers update the
same ``devices`` rows. A batch the database aborts to break a deadlock is written again, not
dropped as if the database were down (a two-server benchmark lost whole batches to this).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from server.db.fleet import Device, DeviceEvent
from server.main import create_app
from tests.conftest import write_key_pair
from tests.server.conftest import authed_client, create_line, make_settings, register, services_of

pytestmark = pytest.mark.postgres

DEVICES = ("cam-a", "cam-b")


def status(device_id: str, reason: str, ts: float) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "ts": ts,
            "state": "idle",
            "model_line": "digits",
            "model_version": 1,
            "release": 1,
            "reason": reason,
        }
    ).encode()


def wait_until_blocked(engine: sa.Engine, timeout: float = 20.0) -> None:
    """Until a backend other than the asking one waits on a row lock."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ).scalar()
            if waiting:
                return
            time.sleep(0.05)
    pytest.fail("the ingest writer never waited on the other transaction's lock")


def test_a_batch_aborted_by_a_deadlock_is_written_again(
    tmp_path: Path, pg_url: str, signing_key: Any
) -> None:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(tmp_path, pg_url, signing_key_path=priv)
    with authed_client(create_app(settings)) as client:
        create_line(client)
        for d in DEVICES:
            register(client, d)
        services = services_of(client)
        ingest = services.ingest
        now = datetime.now(UTC)
        batch = [("status", d, status(d, f"from the batch {d}", 10.0), now) for d in DEVICES]

        other = sa.create_engine(pg_url)
        with other.connect() as conn:
            # The other writer: it holds cam-b and will want cam-a, the reverse of the batch's
            # order. It waits longer before looking for a deadlock, so PostgreSQL breaks the
            # cycle by aborting the batch's transaction (which waits the default 1 s).
            conn.exec_driver_sql("SET deadlock_timeout = '60s'")
            conn.execute(
                sa.update(Device).where(Device.device_id == "cam-b").values(last_reason="other")
            )
            writer = threading.Thread(target=ingest.write_batch, args=(batch,), daemon=True)
            writer.start()
            wait_until_blocked(other)  # the batch holds cam-a and waits for cam-b
            conn.execute(
                sa.update(Device).where(Device.device_id == "cam-a").values(last_reason="other")
            )  # a deadlock: PostgreSQL aborts the batch, and this update goes through
            conn.commit()
            writer.join(timeout=60)
            assert not writer.is_alive()
        other.dispose()

        stats = ingest.stats
        assert stats.conflict_retries >= 1, stats
        assert stats.failed_writes == 0, stats.last_error
        assert stats.status_written == len(DEVICES)
        with services.sessions() as s:
            reasons = dict(s.execute(select(Device.device_id, Device.last_reason)).tuples().all())
            events = s.scalars(select(DeviceEvent.reason).order_by(DeviceEvent.device_id)).all()
        # The batch, written again after the other transaction committed, is the last word.
        assert reasons == {d: f"from the batch {d}" for d in DEVICES}
        assert events == [f"from the batch {d}" for d in DEVICES]
        metrics = client.get("/metrics").text
        assert "edgeloop_ingest_conflict_retries_total" in metrics
