"""The agent's identity: enroll once, keep the credential (0600), send it only to the server,
and stop asking when the server refuses it (no retry storm)."""

from __future__ import annotations

import stat

from device_agent.agent import Agent
from device_agent.identity import credential_path
from tests.device_agent.agent_testkit import (
    FakeServer,
    make_config,
    make_manifest,
    make_model,
    make_target,
    wait_until,
)


def _bootstrap_done(agent: Agent) -> bool:
    return not any(t.name.endswith("-bootstrap") and t.is_alive() for t in agent._threads)


def test_enrolls_once_and_sends_its_credential_to_the_server_only(tmp_path, signing_key) -> None:
    server, mirror = FakeServer().start(), FakeServer().start()
    try:
        server.one_time_tokens = True
        m1 = make_model(1)
        # The artifact lives on another origin (a mirror/CDN): it must not see the credential.
        server.target = make_target(
            make_manifest(m1, release=1, model_version=1), signing_key, mirror.add("m1", m1)
        ).to_json()
        cfg = make_config(tmp_path / "state", signing_key, server_url=server.url)
        agent = Agent(cfg)
        agent.start()
        try:
            assert agent.wait_ready(60)
            assert agent.status()["enrolled"] and agent.status()["identity_error"] is None
        finally:
            agent.stop()
        assert len(server.enrollments) == 1
        assert server.enrollments[0]["bootstrap_token"] == cfg.bootstrap_token
        path = credential_path(cfg.state_dir)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert server.registrations and not server.auth_refusals
        assert mirror.requests_for("m1") and all(
            e["authorization"] is None for e in mirror.requests_for("m1")
        )

        # Restart: the stored credential is used; the (now spent) bootstrap token is not.
        again = Agent(cfg)
        again.start()
        try:
            wait_until(lambda: len(server.registrations) == 2)
        finally:
            again.stop()
        assert len(server.enrollments) == 1 and not server.auth_refusals
    finally:
        server.stop()
        mirror.stop()


def test_a_refused_bootstrap_token_is_reported_once(tmp_path, signing_key) -> None:
    server = FakeServer().start()
    try:
        cfg = make_config(
            tmp_path / "state", signing_key, server_url=server.url, bootstrap_token="wrong"
        )
        agent = Agent(cfg)
        agent.start()
        try:
            wait_until(lambda: agent.status()["identity_error"])
            wait_until(lambda: _bootstrap_done(agent))
            err = agent.status()["identity_error"]
            assert "enrollment refused: HTTP 401" in err and "unknown enrollment token" in err
            assert not agent.status()["enrolled"]
        finally:
            agent.stop()
        assert len(server.enrollments) == 1  # asked once, not in a loop
        assert not server.registrations
        assert not credential_path(cfg.state_dir).exists()
    finally:
        server.stop()


def test_a_revoked_device_stops_asking(tmp_path, signing_key) -> None:
    server = FakeServer().start()
    try:
        cfg = make_config(tmp_path / "state", signing_key, server_url=server.url)
        first = Agent(cfg)
        first.start()
        try:
            wait_until(lambda: server.registrations)
        finally:
            first.stop()
        server.revoked.add(cfg.device_id)
        agent = Agent(cfg)
        agent.start()
        try:
            wait_until(lambda: _bootstrap_done(agent))
            assert "register refused: HTTP 403" in agent.status()["identity_error"]
        finally:
            agent.stop()
        assert server.auth_refusals == [("/api/v1/devices/register", 403)]
    finally:
        server.stop()


class _LostReplyHttp:
    """Answers enrollments in turn: the first reply is lost on the way back, then 201."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def post(self, _url: str, *, json: dict) -> object:
        from device_agent.errors import TransportError

        self.bodies.append(dict(json))
        if len(self.bodies) == 1:
            raise TransportError("connection reset: the reply never arrived")

        class Reply:
            status_code = 201

            def json(self) -> dict:
                return {"credential": "cred-2"}

        return Reply()


def test_a_retried_enrollment_sends_the_same_secret_and_forgets_it_once_enrolled(
    tmp_path, signing_key
) -> None:
    import pytest

    from device_agent.errors import TransportError
    from device_agent.identity import ENROLLMENT_FILE, enroll, load_credential

    config = make_config(tmp_path / "state", signing_key)
    http = _LostReplyHttp()
    with pytest.raises(TransportError):
        enroll(config, http)  # type: ignore[arg-type]
    secret_file = tmp_path / "state" / ENROLLMENT_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert enroll(config, http) == "cred-2"  # type: ignore[arg-type]
    first, retry = http.bodies
    assert first["enroll_secret"] == retry["enroll_secret"]
    assert len(first["enroll_secret"]) >= 32
    assert load_credential(config) == "cred-2"
    assert not secret_file.exists()
