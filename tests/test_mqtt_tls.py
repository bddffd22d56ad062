"""MQTT over TLS between the agent, the server's bridge and a real Mosquitto TLS listener.

The CA, the broker's certificate and the client certificates are made here (``firmware_sim.pki``).
A refused connection is waited for until the link reports why; nothing asserts on a clock.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contract.messages import DeviceState, StatusReport, TargetMessage
from device_agent import cli as agent_cli
from device_agent.config import AgentConfig, config_from_mapping
from device_agent.errors import ConfigError as AgentConfigError
from device_agent.inbox import TargetInbox
from device_agent.mqtt import MqttLink
from firmware_sim.pki import Pki
from firmware_sim.services import Mosquitto
from server.core.config import Settings
from server.core.errors import ConfigError
from server.fleet.broker_tls import bridge_tls_context
from server.fleet.mqtt_bridge import IngestItem, MqttBridge
from server.main import create_app
from tests.conftest import TEST_ADMIN_TOKEN, poll, write_key_pair
from tests.server.conftest import make_settings, services_of


@contextmanager
def started_broker(tmp_path: Path, pki: Pki, **tls: Any) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", tls=pki.broker_tls(**tls)).start()
    try:
        yield broker
    finally:
        broker.stop()


def device_link(
    tmp_path: Path, broker: Mosquitto, device_id: str = "cam-1", **config: Any
) -> tuple[MqttLink, TargetInbox]:
    cfg = AgentConfig(
        device_id=device_id,
        model_line="digits",
        mqtt_host="127.0.0.1",
        mqtt_port=broker.port,
        mqtt_reconnect_min_s=1,
        mqtt_reconnect_max_s=1,
        state_dir=tmp_path / device_id,
        mqtt_tls=True,
        **config,
    )
    inbox = TargetInbox()
    return MqttLink(cfg, inbox), inbox


def test_device_and_server_publish_and_receive_over_tls(
    tmp_path: Path, pki: Pki, tls_broker: Mosquitto, signing_key
) -> None:
    server_cert, server_key = pki.issue("edgeloop-server", client=True)
    device_cert, device_key = pki.issue("cam-1", client=True)
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path}/edgeloop.db",
        signing_key_path=priv,
        enable_mqtt=True,
        mqtt_port=tls_broker.port,
        mqtt_tls=True,
        mqtt_ca_file=pki.ca_file,
        mqtt_client_cert=server_cert,
        mqtt_client_key=server_key,
    )
    with TestClient(create_app(settings)) as client:
        services = services_of(client)
        bridge = services.bridge
        assert bridge is not None
        poll("the server's TLS connection", bridge.connected.is_set, timeout=60)
        target = TargetMessage(model_line="digits", envelope={"x": 1}, artifact_url="http://a/b")
        bridge.publish("cam-1", target)  # retained: the device gets it when it subscribes

        link, inbox = device_link(
            tmp_path, tls_broker, mqtt_ca_file=pki.ca_file,
            mqtt_client_cert=device_cert, mqtt_client_key=device_key,
        )  # fmt: skip
        link.start()
        try:
            poll("the device's TLS connection", link.connected.is_set, timeout=60)
            got, _ = inbox.take_newest(timeout=60)
            assert got is not None and got.payload == target.to_json()
            report = StatusReport(
                device_id="cam-1", ts=1.0, state=DeviceState.IDLE, model_line="digits",
                model_version=1, release=1,
            )  # fmt: skip
            link.publish_status(report)
            kind, device_id, payload, _ = services.ingest_queue.get(timeout=60)
            assert (kind, device_id) == ("status", "cam-1")
            assert json.loads(payload) == report.to_dict()
            assert link.last_error is None and bridge.last_error is None
        finally:
            link.stop()


def test_a_device_trusting_another_ca_is_refused_and_says_why(
    tmp_path: Path, pki: Pki, tls_broker: Mosquitto
) -> None:
    other = Pki.create(tmp_path / "other", "other")
    cert, key = pki.issue("cam-1", client=True)
    wrong, _ = device_link(
        tmp_path, tls_broker, mqtt_ca_file=other.ca_file, mqtt_client_cert=cert,
        mqtt_client_key=key,
    )  # fmt: skip
    wrong.start()
    try:
        error = poll("the refusal's reason", lambda: wrong.last_error, timeout=60)
        assert "certificate was refused" in error and "verify failed" in error
        assert not wrong.connected.is_set()
        assert wrong.loop_alive  # paho's thread goes on retrying: no crash
        # The broker is up and serves a device with the right CA meanwhile.
        right, _ = device_link(
            tmp_path, tls_broker, device_id="cam-2", mqtt_ca_file=pki.ca_file,
            mqtt_client_cert=cert, mqtt_client_key=key,
        )  # fmt: skip
        right.start()
        try:
            poll("the right device's connection", right.connected.is_set, timeout=60)
        finally:
            right.stop()
        assert not wrong.connected.is_set() and wrong.loop_alive
    finally:
        wrong.stop()


def test_a_device_without_the_client_certificate_the_broker_requires_says_why(
    tmp_path: Path, pki: Pki, tls_broker: Mosquitto
) -> None:
    link, _ = device_link(tmp_path, tls_broker, mqtt_ca_file=pki.ca_file)  # no certificate
    link.start()
    try:
        error = poll("the refusal's reason", lambda: link.last_error, timeout=60)
        assert "closed the connection before accepting it" in error
        assert "client certificate" in error
        assert not link.connected.is_set() and link.loop_alive
    finally:
        link.stop()


def test_a_certificate_for_another_host_name_is_refused(tmp_path: Path, pki: Pki) -> None:
    """The broker's certificate names broker.invalid only; we connect to 127.0.0.1."""
    with started_broker(tmp_path, pki, dns=("broker.invalid",), ips=()) as broker:
        link, _ = device_link(tmp_path, broker, mqtt_ca_file=pki.ca_file)
        ingest: queue.Queue[IngestItem] = queue.Queue()
        ctx = bridge_tls_context(
            Settings(mqtt_tls=True, mqtt_ca_file=pki.ca_file, mqtt_reconnect_max_s=1)
        )
        bridge = MqttBridge(host="127.0.0.1", port=broker.port, ingest_queue=ingest, tls=ctx)
        link.start()
        bridge.start()
        try:
            error = poll("the device's refusal", lambda: link.last_error, timeout=60)
            assert "mismatch" in error and "127.0.0.1" in error
            error = poll("the server's refusal", lambda: bridge.last_error, timeout=60)
            assert "mismatch" in error and bridge.stats.connect_failures >= 1
            assert not link.connected.is_set() and not bridge.connected.is_set()
            # The development-only switch skips the name check (the chain is still verified).
            lax, _ = device_link(
                tmp_path, broker, device_id="cam-2", mqtt_ca_file=pki.ca_file,
                mqtt_tls_insecure=True,
            )  # fmt: skip
            lax.start()
            try:
                poll("the insecure device's connection", lax.connected.is_set, timeout=60)
            finally:
                lax.stop()
        finally:
            link.stop()
            bridge.stop()


# ---- configuration: refused at start, with a clear message -----------------------------------


def agent_config(tmp_path: Path, **values: Any) -> AgentConfig:
    return config_from_mapping(
        {"device_id": "cam-1", "model_line": "digits", **values}, base=tmp_path, env={}
    )


def test_agent_production_refuses_plain_mqtt_unless_allowed(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(AgentConfigError, match="production refuses plain MQTT"):
        agent_config(tmp_path, environment="production")
    assert not agent_config(tmp_path, environment="production", mqtt_allow_plaintext=True).mqtt_tls
    ok = agent_config(
        tmp_path, environment="production", mqtt_tls=True, mqtt_ca_file="pki/fleet-ca.pem"
    )
    assert ok.mqtt_ca_file == pki.ca_file  # relative to the config file
    with pytest.raises(AgentConfigError, match="mqtt_tls_insecure .* development only"):
        agent_config(tmp_path, environment="production", mqtt_tls=True, mqtt_tls_insecure=True)
    with pytest.raises(AgentConfigError, match="mqtt_ca_file set but mqtt_tls is off"):
        agent_config(tmp_path, mqtt_ca_file="pki/fleet-ca.pem")


def test_agent_refuses_missing_or_unreadable_tls_files(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(AgentConfigError, match=r"mqtt_ca_file .*nope\.pem: no such file"):
        agent_config(tmp_path, mqtt_tls=True, mqtt_ca_file="nope.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(AgentConfigError, match="mqtt_ca_file .*junk.pem: not a readable PEM"):
        agent_config(tmp_path, mqtt_tls=True, mqtt_ca_file="junk.pem")
    with pytest.raises(AgentConfigError, match="mqtt_client_cert .*junk.pem.*not a readable PEM"):
        agent_config(
            tmp_path, mqtt_tls=True, mqtt_ca_file=str(pki.ca_file), mqtt_client_cert="junk.pem"
        )
    cert, _ = pki.issue("cam-1", client=True)
    _, other_key = pki.issue("cam-2", client=True)
    with pytest.raises(AgentConfigError, match="mqtt_client_cert .* matching key"):
        agent_config(
            tmp_path, mqtt_tls=True, mqtt_client_cert=str(cert), mqtt_client_key=str(other_key)
        )


def test_agent_cli_exits_2_on_a_refused_mqtt_config(tmp_path: Path, capsys) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"device_id": "cam-1", "model_line": "digits",
                                "environment": "production"}))  # fmt: skip
    assert agent_cli.main(["status", "--config", str(path)]) == 2
    assert "production refuses plain MQTT" in capsys.readouterr().err


def test_server_production_refuses_plain_mqtt_unless_allowed(tmp_path: Path, pki: Pki) -> None:
    prod: dict[str, Any] = dict(
        environment="production", admin_token="a-real-admin-token", data_dir=tmp_path / "v",
        database_url=f"sqlite:///{tmp_path}/never-opened.db",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="production refuses plain MQTT"):
        create_app(Settings(**prod))
    assert not (tmp_path / "never-opened.db").exists()  # refused before anything was opened
    assert bridge_tls_context(Settings(**prod, mqtt_allow_plaintext=True)) is None
    assert bridge_tls_context(Settings(**prod, mqtt_tls=True, mqtt_ca_file=pki.ca_file))
    with pytest.raises(ConfigError, match=r"mqtt_ca_file .*missing\.pem: no such file"):
        bridge_tls_context(Settings(**prod, mqtt_tls=True, mqtt_ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="mqtt_tls_insecure .* development only"):
        bridge_tls_context(Settings(**prod, mqtt_tls=True, mqtt_tls_insecure=True))
    # A test app without the bridge thread has no broker link to refuse.
    assert bridge_tls_context(Settings(mqtt_tls=False)) is None


def test_edgeloop_server_exits_2_on_plain_mqtt_in_production(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "EDGELOOP_ENVIRONMENT": "production",
        "EDGELOOP_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
        "EDGELOOP_DATA_DIR": str(tmp_path / "var"),
        "EDGELOOP_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
    }
    done = subprocess.run(
        [sys.executable, "-c", "from server.main import run; run()"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "production refuses plain MQTT" in done.stderr
