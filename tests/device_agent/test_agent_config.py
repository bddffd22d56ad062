"""load_config: JSON keys are field names, key files are PEM paths, env overrides win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent import AgentConfig, ConfigError, load_config
from tests.device_agent.agent_testkit import public_pem


def test_load_config_with_env_overrides(tmp_path: Path, signing_key) -> None:
    (tmp_path / "k.pem").write_bytes(public_pem(signing_key))
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps(
            {
                "device_id": "d-1",
                "model_line": "digits",
                "state_dir": "st",
                "trusted_key_files": ["k.pem"],
                "confidence_floor": 0.5,
                "server_url": "http://x:1/",
            }
        )
    )
    cfg = load_config(
        path,
        env={
            "EDGELOOP_AGENT_MQTT_PORT": "1999",
            "EDGELOOP_AGENT_CAPTURE_WRONG": "false",
            "EDGELOOP_AGENT_UPLOAD_INTERVAL_S": "2.5",
        },
    )
    assert isinstance(cfg, AgentConfig)
    assert cfg.mqtt_port == 1999 and cfg.capture_wrong is False and cfg.upload_interval_s == 2.5
    assert cfg.state_dir == tmp_path / "st" and cfg.server_url == "http://x:1"
    assert cfg.trusted_keys == [public_pem(signing_key)] and cfg.confidence_floor == 0.5


@pytest.mark.parametrize(
    "data",
    [
        {"device_id": "d/1", "model_line": "digits"},
        {"device_id": "d", "model_line": "digits", "bogus": 1},
        {"device_id": "d", "model_line": "digits", "trusted_key_files": ["missing.pem"]},
    ],
)
def test_bad_config_refused(tmp_path: Path, data) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError):
        load_config(path, env={})
