"""Capture decisions, the durable spool and the uploader against a real local HTTP server."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from contract.messages import SampleRecord
from device_agent.capture import (
    Capture,
    PendingPrediction,
    PendingPredictions,
    Spool,
    Uploader,
    capture_reason,
)
from device_agent.errors import UnknownPredictionError
from device_agent.http import HttpClient
from device_agent.metrics import Metrics
from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    device_http,
    make_config,
    wait_until,
)


def record(i: int = 0) -> SampleRecord:
    return SampleRecord(
        sample_id=uuid.uuid4().hex,
        device_id="dev-1",
        model_line="digits",
        model_version=1,
        input_b64="AAAA" * 4,
        true_label=i % 10,
        predicted_label=(i + 1) % 10,
        confidence=0.5,
        captured_at=1.0,
    )


def test_capture_reason_decisions() -> None:
    assert capture_reason(3, 4, 0.99, floor=0.6, capture_wrong=True) == "wrong"
    assert capture_reason(3, 3, 0.40, floor=0.6, capture_wrong=True) == "low_confidence"
    assert capture_reason(3, 3, 0.95, floor=0.6, capture_wrong=True) is None
    assert capture_reason(3, 4, 0.95, floor=0.6, capture_wrong=False) is None


def test_feedback_captures_and_counts(tmp_path, signing_key) -> None:
    cfg = make_config(tmp_path, signing_key)
    spool = Spool(tmp_path / "spool", batch_max=100, max_bytes=1 << 20)
    metrics = Metrics(device_id="dev-1", model_line="digits", clock=lambda: 100.0)
    cap = Capture(cfg, spool=spool, metrics=metrics, clock=lambda: 100.0)
    x = np.arange(FEATURES, dtype=np.float32)
    cases = {"wrong": (3, 0.99, 4), "unsure": (3, 0.41, 3), "fine": (3, 0.95, 3)}
    for pid, (label, conf, _) in cases.items():
        cap.remember(pid, PendingPrediction(x=x, label=label, confidence=conf, model_version=2))
    assert cap.feedback("wrong", 4) is True
    assert cap.feedback("unsure", 3) is True
    assert cap.feedback("fine", 3) is False
    with pytest.raises(UnknownPredictionError):
        cap.feedback("fine", 3)  # already labelled
    assert spool.stats().pending == 2
    (report,) = metrics.snapshot_and_reset()
    assert (report.model_version, report.labelled, report.correct) == (2, 3, 2)


def test_pending_predictions_bounded_oldest_dropped() -> None:
    pending = PendingPredictions(max_items=3)
    item = PendingPrediction(x=np.zeros(1), label=0, confidence=1.0, model_version=1)
    for i in range(5):
        pending.add(str(i), item)
    assert len(pending) == 3 and pending.evicted == 2
    assert pending.pop("0") is None and pending.pop("4") is not None


def test_spool_bound_drops_oldest_and_counts(tmp_path) -> None:
    spool = Spool(tmp_path / "spool", batch_max=5, max_bytes=4000)
    batches = []
    for _ in range(10):
        ids = []
        for i in range(5):
            r = record(i)
            ids.append(r.sample_id)
            spool.add(r)
        batches.append(ids)
    stats = spool.stats()
    assert stats.dropped > 0 and stats.dropped % 5 == 0
    assert stats.pending + stats.dropped == 50
    size = sum(p.stat().st_size for p in (tmp_path / "spool").glob("batch-*.json*"))
    assert 0 < size <= 4000
    nxt = spool.next_batch()  # the oldest survivor is a later batch
    assert nxt is not None
    path, body, _ = nxt
    first_kept = [s["sample_id"] for s in body["samples"]]
    assert first_kept == batches[stats.dropped // 5]
    spool.release()
    # Counters survive a restart.
    assert Spool(tmp_path / "spool", batch_max=5, max_bytes=4000).stats() == stats


def test_spool_survives_restart_and_uploads_exactly_once(
    tmp_path, signing_key, fake_server: FakeServer
) -> None:
    cfg = make_config(tmp_path, signing_key, server_url=fake_server.url, upload_batch_max=4)
    spool = Spool(tmp_path / "spool", batch_max=4, max_bytes=1 << 20)
    sent = [record(i) for i in range(10)]
    for r in sent:
        spool.add(r)
    spool.seal()
    del spool  # "crash": nothing uploaded yet
    fake_server.sample_statuses = [503, 503]  # the first attempts fail, then 200
    spool = Spool(tmp_path / "spool", batch_max=4, max_bytes=1 << 20)
    assert spool.stats().pending == 10
    stop = threading.Event()
    with device_http(fake_server) as client:
        up = Uploader(cfg, spool=spool, client=client, stop=stop)
        thread = threading.Thread(target=up.run)
        thread.start()
        try:
            wait_until(lambda: spool.stats().pending == 0)
            # Idle rounds after the ack must not send anything again.
            before, rounds = len(fake_server.received_ids), up.rounds
            wait_until(lambda: up.rounds >= rounds + 3)
        finally:
            stop.set()
            spool.batch_full.set()
            thread.join(30)
    ids = [r.sample_id for r in sent]
    assert sorted(fake_server.acked_ids) == sorted(ids)  # none lost
    assert len(fake_server.acked_ids) == len(set(fake_server.acked_ids))
    assert len(fake_server.received_ids) == before  # nothing sent after the ack
    # Every id was received once per 503 attempt plus once acknowledged: 503s resent the same.
    assert len(fake_server.received_ids) == 10 + 2 * 4
    stats = spool.stats()
    assert (stats.uploaded, stats.pending, stats.dropped) == (10, 0, 0)
    assert not list((tmp_path / "spool").glob("batch-*.json*"))


def test_whole_batch_4xx_moved_aside(tmp_path, signing_key, fake_server: FakeServer) -> None:
    cfg = make_config(tmp_path, signing_key, server_url=fake_server.url)
    spool = Spool(tmp_path / "spool", batch_max=10, max_bytes=1 << 20)
    for i in range(3):
        spool.add(record(i))
    fake_server.sample_statuses = [422]
    with device_http(fake_server) as client:
        up = Uploader(cfg, spool=spool, client=client, stop=threading.Event())
        assert up.upload_once() is True
        assert up.upload_once() is True
    assert spool.stats().rejected == 3 and spool.stats().pending == 0
    assert len(list((tmp_path / "spool" / "rejected").iterdir())) == 1
    assert len(fake_server.received_ids) == 3  # never retried


def test_server_down_keeps_batches(tmp_path, signing_key) -> None:
    cfg = make_config(tmp_path, signing_key)  # server_url points at a closed port
    spool = Spool(tmp_path / "spool", batch_max=10, max_bytes=1 << 20)
    spool.add(record())
    with HttpClient(timeout_s=2) as client:
        up = Uploader(cfg, spool=spool, client=client, stop=threading.Event())
        assert up.upload_once() is False
    assert spool.stats().pending == 1
    assert up.last_error is not None
