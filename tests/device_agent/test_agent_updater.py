"""The update flow against real ONNX Runtime and a real local HTTP server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import (
    ExpiredManifestError,
    ModelLineMismatchError,
    RollbackRefusedError,
    SignatureInvalidError,
)
from device_agent.verify import verify_target
from tests.device_agent.agent_testkit import (
    LINE,
    FakeServer,
    Rig,
    make_manifest,
    make_model,
    make_target,
    sha256,
)

M1, M2, M3 = make_model(1), make_model(2), make_model(3)


def install(
    rig: Rig,
    srv: FakeServer,
    data: bytes,
    *,
    release: int,
    version: int,
    rollout_id: int | None = None,
) -> str:
    url = srv.add(f"m{version}.onnx", data)
    target = make_target(
        make_manifest(data, release=release, model_version=version),
        rig.key,
        url,
        rollout_id=rollout_id,
    )
    return rig.updater.handle_target(target).value


def test_install_reports_each_step_and_persists(rig: Rig, fake_server: FakeServer) -> None:
    assert install(rig, fake_server, M1, release=1, version=1, rollout_id=7) == "committed"
    assert rig.states() == [
        "notified",
        "downloading",
        "verifying",
        "installing",
        "installed",
        "committed",
    ]
    assert rig.serving_version() == 1
    assert rig.store.has_model(sha256(M1))
    installed = [r for r in rig.reports if r.state.value == "installed"][0]
    assert (installed.model_version, installed.release, installed.rollout_id) == (1, 1, 7)
    state = rig.store.load_state()
    assert state.current is not None and state.current.sha256 == sha256(M1)
    assert state.highest_release == 1
    assert not list(rig.store.downloads_dir.iterdir())


def test_other_key_refused_old_model_keeps_serving(rig: Rig, fake_server: FakeServer) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    rogue = Ed25519PrivateKey.generate()
    manifest = make_manifest(M2, release=2, model_version=2)
    target = make_target(manifest, rogue, fake_server.add("m2.onnx", M2))
    with pytest.raises(SignatureInvalidError):
        verify_target(
            target, rig.updater._trusted, model_line=LINE, highest_release=1, now=datetime.now(UTC)
        )
    rig.reports.clear()
    assert rig.updater.handle_target(target).value == "refused"
    assert rig.states() == ["refused"]
    assert rig.reports[0].reason.startswith("SignatureInvalidError")
    assert rig.reports[0].model_version == 1
    assert rig.serving_version() == 1
    assert fake_server.requests_for("m2.onnx") == []  # never even downloaded
    assert not rig.store.has_model(sha256(M2))


def test_hash_mismatch_refused_and_not_activated(rig: Rig, fake_server: FakeServer) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    fake_server.mode = "wrong_bytes"
    rig.reports.clear()
    assert install(rig, fake_server, M2, release=2, version=2) == "refused"
    # One fresh download from byte 0 (a resumed file may hold garbled bytes), then refused.
    assert rig.states() == [
        "notified",
        "downloading",
        "verifying",
        "downloading",
        "verifying",
        "refused",
    ]
    assert [e["range"] for e in fake_server.requests_for("m2.onnx")] == [None, None]
    assert rig.reports[-1].reason.startswith("HashMismatchError")
    assert rig.serving_version() == 1
    assert not rig.store.has_model(sha256(M2))
    assert not rig.store.part_path(sha256(M2)).exists()
    assert rig.store.load_state().highest_release == 1
    # The same release with the right bytes installs afterwards.
    fake_server.mode = "normal"
    assert install(rig, fake_server, M2, release=2, version=2) == "committed"
    assert rig.serving_version() == 2


def test_older_release_refused(rig: Rig, fake_server: FakeServer) -> None:
    install(rig, fake_server, M2, release=5, version=2)
    target = make_target(
        make_manifest(M1, release=4, model_version=1), rig.key, fake_server.add("m1.onnx", M1)
    )
    with pytest.raises(RollbackRefusedError):
        verify_target(
            target, rig.updater._trusted, model_line=LINE, highest_release=5, now=datetime.now(UTC)
        )
    assert rig.updater.handle_target(target).value == "refused"
    assert rig.reports[-1].reason.startswith("RollbackRefusedError")
    assert rig.serving_version() == 2


def test_expired_manifest_refused(rig: Rig, fake_server: FakeServer) -> None:
    past = datetime.now(UTC) - timedelta(days=3)
    manifest = make_manifest(M1, release=1, model_version=1, now=past, expires_in=timedelta(1))
    target = make_target(manifest, rig.key, fake_server.add("m1.onnx", M1))
    with pytest.raises(ExpiredManifestError):
        verify_target(
            target, rig.updater._trusted, model_line=LINE, highest_release=0, now=datetime.now(UTC)
        )
    assert rig.updater.handle_target(target).value == "refused"
    assert rig.reports[-1].reason.startswith("ExpiredManifestError")
    assert rig.serving_version() is None


def test_expiry_uses_injected_clock(rig: Rig, fake_server: FakeServer) -> None:
    manifest = make_manifest(M1, release=1, model_version=1, expires_in=timedelta(hours=1))
    target = make_target(manifest, rig.key, fake_server.add("m1.onnx", M1))
    rig.now += 2 * 3600
    assert rig.updater.handle_target(target).value == "refused"
    rig.now -= 2 * 3600
    assert rig.updater.handle_target(target).value == "committed"


def test_model_line_mismatch_refused(rig: Rig, fake_server: FakeServer) -> None:
    manifest = make_manifest(M1, release=1, model_version=1, model_line="faces")
    target = make_target(manifest, rig.key, fake_server.add("m1.onnx", M1))
    with pytest.raises(ModelLineMismatchError):
        verify_target(
            target, rig.updater._trusted, model_line=LINE, highest_release=0, now=datetime.now(UTC)
        )
    assert rig.updater.handle_target(target).value == "refused"


def test_same_model_already_installed_no_download(rig: Rig, fake_server: FakeServer) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    rig.reports.clear()
    assert install(rig, fake_server, M1, release=1, version=1) == "already_installed"
    assert install(rig, fake_server, M1, release=3, version=1, rollout_id=9) == (
        "already_installed"
    )
    assert len(fake_server.requests_for("m1.onnx")) == 1
    state = rig.store.load_state()
    assert state.current is not None
    assert state.highest_release == 3 and state.current.release == 3
    assert state.current.rollout_id == 9


def test_rollback_release_reuses_held_artifact_and_gc(rig: Rig, fake_server: FakeServer) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    install(rig, fake_server, M2, release=2, version=2)
    assert rig.store.has_model(sha256(M1)) and rig.store.has_model(sha256(M2))
    # Operator rollback: a new release (3) pointing at the old bytes, already held on disk.
    assert install(rig, fake_server, M1, release=3, version=1) == "committed"
    assert len(fake_server.requests_for("m1.onnx")) == 1
    assert "downloading" not in rig.states()[-5:]
    assert rig.serving_version() == 1
    # A third model: the oldest no-longer-needed artifact is garbage-collected.
    install(rig, fake_server, M3, release=4, version=3)
    held = {p.name for p in rig.store.models_dir.iterdir()}
    assert held == {f"{sha256(M3)}.onnx", f"{sha256(M1)}.onnx"}


def test_transport_failure_reports_failed_and_keeps_model(
    rig: Rig, fake_server: FakeServer
) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    manifest = make_manifest(M2, release=2, model_version=2)
    target = make_target(manifest, rig.key, f"{fake_server.url}/artifacts/missing.onnx")
    assert rig.updater.handle_target(target).value == "failed"
    assert rig.reports[-1].reason.startswith("TransportError")
    assert rig.serving_version() == 1
    assert rig.store.load_state().highest_release == 1


def test_unloadable_artifact_fails_and_keeps_model(rig: Rig, fake_server: FakeServer) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    junk = b"not an onnx model" * 10
    assert install(rig, fake_server, junk, release=2, version=2) == "failed"
    assert rig.reports[-1].reason.startswith("ModelLoadError")
    assert rig.serving_version() == 1
    current = rig.store.load_state().current
    assert current is not None and current.sha256 == sha256(M1)


def test_resume_from_persisted_state_and_fallback(
    rig: Rig, fake_server: FakeServer, tmp_path, signing_key
) -> None:
    install(rig, fake_server, M1, release=1, version=1)
    install(rig, fake_server, M2, release=2, version=2)
    again = Rig(tmp_path / "state", signing_key)
    assert again.updater.resume() is not None
    assert again.serving_version() == 2
    # Corrupt the current artifact on disk: start falls back to the previous good model.
    again.store.model_path(sha256(M2)).write_bytes(b"\0" * len(M2))
    third = Rig(tmp_path / "state", signing_key)
    assert third.updater.resume() is not None
    assert third.serving_version() == 1
    assert third.store.load_state().highest_release == 2  # rollback protection survives
    # With another trusted key nothing verifies: no model until a target arrives.
    stranger = Rig(tmp_path / "state", Ed25519PrivateKey.generate())
    assert stranger.updater.resume() is None
    for r in (again, third, stranger):
        r.close()
