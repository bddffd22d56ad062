"""Bounded, resumable downloads against a real local HTTP server with fault switches."""

from __future__ import annotations

import pytest

from device_agent.errors import LengthError, TransportError
from device_agent.fetcher import HttpFetcher
from device_agent.verify import verify_artifact
from tests.device_agent.agent_testkit import (
    FakeServer,
    Rig,
    make_config,
    make_manifest,
    make_model,
    make_target,
    sha256,
)
from tests.device_agent.netkit import redirect

DATA = make_model(11) * 40  # ~100 KiB: several chunks at the test chunk size
REF = make_manifest(DATA, release=1, model_version=1).artifact


@pytest.fixture
def fetcher(tmp_path, signing_key):
    cfg = make_config(tmp_path / "state", signing_key, download_chunk_bytes=4096)
    f = HttpFetcher(cfg)
    yield f
    f.close()


def test_full_download_verifies(fetcher: HttpFetcher, fake_server: FakeServer, tmp_path) -> None:
    dest = tmp_path / f"{REF.sha256}.part"
    fetcher.fetch(fake_server.add("a.onnx", DATA), dest, expected_size=REF.size)
    verify_artifact(dest, REF)
    assert [e["range"] for e in fake_server.requests_for("a.onnx")] == [None]


def test_resume_requests_only_the_rest(
    fetcher: HttpFetcher, fake_server: FakeServer, tmp_path
) -> None:
    half = len(DATA) // 2
    dest = tmp_path / f"{REF.sha256}.part"
    dest.write_bytes(DATA[:half])
    fetcher.fetch(fake_server.add("a.onnx", DATA), dest, expected_size=REF.size)
    log = fake_server.requests_for("a.onnx")
    assert [(e["range"], e["status"]) for e in log] == [(f"bytes={half}-", 206)]
    assert log[0]["sent"] == len(DATA) - half
    verify_artifact(dest, REF)


def test_server_ignoring_range_falls_back_to_full(
    fetcher: HttpFetcher, fake_server: FakeServer, tmp_path
) -> None:
    fake_server.mode = "ignore_range"
    dest = tmp_path / "x.part"
    dest.write_bytes(DATA[:1000])
    fetcher.fetch(fake_server.add("a.onnx", DATA), dest, expected_size=REF.size)
    assert [e["status"] for e in fake_server.requests_for("a.onnx")] == [200]
    verify_artifact(dest, REF)


def test_truncated_body_is_transport_error_then_resumes(
    fetcher: HttpFetcher, fake_server: FakeServer, tmp_path
) -> None:
    fake_server.mode = "truncate"
    dest = tmp_path / "x.part"
    url = fake_server.add("a.onnx", DATA)
    with pytest.raises(TransportError):
        fetcher.fetch(url, dest, expected_size=REF.size)
    kept = dest.stat().st_size
    assert 0 < kept < len(DATA)
    fake_server.mode = "normal"
    fetcher.fetch(url, dest, expected_size=REF.size)
    assert fake_server.requests_for("a.onnx")[-1]["range"] == f"bytes={kept}-"
    verify_artifact(dest, REF)


def test_dropped_connection_retried_with_range(
    tmp_path, signing_key, fake_server: FakeServer
) -> None:
    cfg = make_config(tmp_path / "s", signing_key, download_chunk_bytes=4096, download_retries=2)
    fetcher = HttpFetcher(cfg)
    fake_server.mode = "drop_once"
    fake_server.drop_after = 30_000
    dest = tmp_path / "x.part"
    try:
        fetcher.fetch(fake_server.add("a.onnx", DATA), dest, expected_size=REF.size)
    finally:
        fetcher.close()
    log = fake_server.requests_for("a.onnx")
    assert len(log) == 2 and log[0]["range"] is None
    assert log[1]["range"].startswith("bytes=") and log[1]["status"] == 206
    verify_artifact(dest, REF)


def test_oversize_body_cut_off_while_streaming(
    fetcher: HttpFetcher, fake_server: FakeServer, tmp_path
) -> None:
    fake_server.mode = "oversize"  # the artifact, then 64 MiB of junk, no Content-Length
    dest = tmp_path / "x.part"
    with pytest.raises(LengthError):
        fetcher.fetch(fake_server.add("a.onnx", DATA), dest, expected_size=REF.size)
    assert not dest.exists() or dest.stat().st_size <= REF.size
    total = len(DATA) + fake_server.oversize_extra
    # The server could not push everything: the agent closed the connection early.
    entry = fake_server.requests_for("a.onnx")[0]
    from tests.device_agent.agent_testkit import wait_until

    wait_until(lambda: entry.get("aborted") or entry["sent"] >= total, timeout=60)
    assert entry["sent"] < total


def test_declared_oversize_refused_before_body(
    tmp_path, signing_key, fake_server: FakeServer
) -> None:
    cfg = make_config(tmp_path / "s", signing_key)
    fetcher = HttpFetcher(cfg)
    dest = tmp_path / "x.part"
    try:
        with pytest.raises(LengthError):  # server declares more bytes than signed
            fetcher.fetch(fake_server.add("a.onnx", DATA), dest, expected_size=REF.size - 10)
    finally:
        fetcher.close()
    assert not dest.exists() or dest.stat().st_size <= REF.size - 10


def test_artifact_over_cap_refused_without_request(
    tmp_path, signing_key, fake_server: FakeServer
) -> None:
    cfg = make_config(tmp_path / "s", signing_key, max_artifact_bytes=1024)
    fetcher = HttpFetcher(cfg)
    try:
        with pytest.raises(LengthError):
            fetcher.fetch(
                fake_server.add("a.onnx", DATA), tmp_path / "x.part", expected_size=REF.size
            )
    finally:
        fetcher.close()
    assert fake_server.requests_for("a.onnx") == []


def test_oversize_through_updater_refused_and_old_model_serves(
    rig: Rig, fake_server: FakeServer
) -> None:
    m1, m2 = make_model(1), make_model(2)
    t1 = make_target(
        make_manifest(m1, release=1, model_version=1), rig.key, fake_server.add("m1.onnx", m1)
    )
    assert rig.updater.handle_target(t1).value == "committed"
    fake_server.mode = "oversize"
    fake_server.oversize_extra = 4 * 1024 * 1024
    t2 = make_target(
        make_manifest(m2, release=2, model_version=2), rig.key, fake_server.add("m2.onnx", m2)
    )
    assert rig.updater.handle_target(t2).value == "refused"
    assert rig.reports[-1].reason.startswith("LengthError")
    assert rig.serving_version() == 1
    assert not rig.store.has_model(sha256(m2))


def test_complete_file_of_other_size_is_content_error_not_retried(
    tmp_path, signing_key, fake_server: FakeServer
) -> None:
    cfg = make_config(tmp_path / "s", signing_key, download_retries=3)
    fetcher = HttpFetcher(cfg)
    url = fake_server.add("short.onnx", b"not a model at all" * 100)
    try:
        with pytest.raises(LengthError, match="size"):
            fetcher.fetch(url, tmp_path / "x.part", expected_size=REF.size)
    finally:
        fetcher.close()
    assert len(fake_server.requests_for("short.onnx")) == 1  # bad content: no retry


def test_backoff_delay_stays_capped_after_thousands_of_attempts() -> None:
    """A device that has retried for days (attempt past 1023) still gets a delay, not an
    OverflowError that kills the worker."""
    import random

    from device_agent.fetcher import backoff_delay

    rng = random.Random(0)
    for attempt in (0, 1, 10, 1023, 1024, 10**6):
        delay = backoff_delay(attempt, 1.0, 60.0, rng)
        assert 0 < delay <= 60.0
    assert backoff_delay(10**6, 1.0, 60.0, rng) >= 30.0  # half of the cap is fixed


def test_redirected_download_is_refused_when_the_bytes_do_not_match_the_signed_hash(
    rig: Rig, fake_server: FakeServer
) -> None:
    m1, m2 = make_model(1), make_model(2)
    t1 = make_target(
        make_manifest(m1, release=1, model_version=1), rig.key, fake_server.add("m1.onnx", m1)
    )
    assert rig.updater.handle_target(t1).value == "committed"
    cdn = FakeServer(mode="wrong_bytes").start()  # the signed size, other bytes
    try:
        fake_server.raw_responses["/artifacts/m2.onnx"] = redirect(cdn.add("m2.onnx", m2))
        t2 = make_target(
            make_manifest(m2, release=2, model_version=2),
            rig.key,
            f"{fake_server.url}/artifacts/m2.onnx",
        )
        assert rig.updater.handle_target(t2).value == "refused"
        # Followed: the body came from the CDN (twice: a bad hash earns one fresh download).
        assert [e["status"] for e in cdn.requests_for("m2.onnx")] == [200, 200]
    finally:
        cdn.stop()
    assert rig.reports[-1].reason.startswith("HashMismatchError")
    assert rig.serving_version() == 1
    assert not rig.store.has_model(sha256(m2))


def test_redirected_download_with_the_signed_bytes_installs(
    rig: Rig, fake_server: FakeServer
) -> None:
    m1 = make_model(1)
    cdn = FakeServer().start()
    try:
        fake_server.raw_responses["/artifacts/m1.onnx"] = redirect(cdn.add("m1.onnx", m1), 307)
        t1 = make_target(
            make_manifest(m1, release=1, model_version=1),
            rig.key,
            f"{fake_server.url}/artifacts/m1.onnx",
        )
        assert rig.updater.handle_target(t1).value == "committed"
    finally:
        cdn.stop()
    assert rig.serving_version() == 1


def test_production_device_refuses_a_redirect_to_plain_http_and_keeps_serving(
    tmp_path, signing_key, fake_server: FakeServer
) -> None:
    rig = Rig(
        tmp_path / "state",
        signing_key,
        environment="production",
        mqtt_allow_plaintext=True,  # no broker here; production refuses plain MQTT otherwise
        download_retries=3,
    )
    cdn = FakeServer().start()
    try:
        m1, m2 = make_model(1), make_model(2)
        t1 = make_target(
            make_manifest(m1, release=1, model_version=1), rig.key, fake_server.add("m1.onnx", m1)
        )
        assert rig.updater.handle_target(t1).value == "committed"
        fake_server.raw_responses["/artifacts/m2.onnx"] = redirect(cdn.add("m2.onnx", m2))
        t2 = make_target(
            make_manifest(m2, release=2, model_version=2),
            rig.key,
            f"{fake_server.url}/artifacts/m2.onnx",
        )
        assert rig.updater.handle_target(t2).value == "failed"  # transient: retried later
        assert rig.reports[-1].reason.startswith("RedirectError")
        assert cdn.requests_for("m2.onnx") == []
        # The same URL redirects the same way: no immediate retries of the download.
        assert len(fake_server.requests_for("m2.onnx")) == 1
        assert rig.serving_version() == 1
    finally:
        cdn.stop()
        rig.close()
