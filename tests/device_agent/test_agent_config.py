"""load_config: JSON keys are field names, key files are PEM paths, env overrides win; every
value is type-checked, and a bad file is refused with each problem named."""

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


def write(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"device_id": "d-1", "model_line": "digits", **extra}))
    return path


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mqtt_port", "oops", 'mqtt_port: "oops" is a string, expected an integer'),
        ("spool_fsync", "no", 'spool_fsync: "no" is a string, expected true or false'),
        ("mqtt_port", 1883.5, "mqtt_port: 1883.5 is a number, expected an integer"),
        ("confidence_floor", True, "confidence_floor: true is a boolean, expected a number"),
        ("groups", "site-east", 'groups: "site-east" is a string, expected a list of strings'),
        ("groups", ["a", 2], 'groups: ["a", 2] is a list, expected a list of strings'),
        ("state_dir", None, "state_dir: null, expected a path"),
        ("ca_bundle", 7, "ca_bundle: 7 is an integer, expected a path or null"),
        (
            "environment",
            "prod",
            'environment: "prod" is a string, expected one of "development", "production"',
        ),
        ("trusted_key_files", "k.pem", 'trusted_key_files: "k.pem" is a string, expected a list'),
    ],
)
def test_a_mistyped_value_names_the_field_the_value_and_the_type(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    path = write(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in str(err.value) and str(path) in str(err.value)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, mqtt_prot=1883, spool_fsync="no", colour="blue")
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_line": 3}))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    msg = str(err.value)
    assert "mqtt_prot: unknown key (did you mean 'mqtt_port'?)" in msg
    assert "colour: unknown key" in msg
    assert 'spool_fsync: "no" is a string, expected true or false' in msg
    assert "model_line: 3 is an integer, expected a string" in msg


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"model_line": "digits"}))
    with pytest.raises(ConfigError, match="device_id: missing, expected a string"):
        load_config(path, env={})


def test_json_integers_are_numbers_and_strings_are_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, upload_interval_s=2, state_dir="st"), env={})
    assert cfg.upload_interval_s == 2.0 and isinstance(cfg.upload_interval_s, float)
    assert cfg.state_dir == tmp_path / "st"


def test_a_config_built_in_python_is_checked_too() -> None:
    with pytest.raises(ConfigError, match='mqtt_port: "1883" is a string, expected an integer'):
        AgentConfig(device_id="d-1", model_line="digits", mqtt_port="1883")  # type: ignore[arg-type]


def test_a_mistyped_environment_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EDGELOOP_AGENT_MQTT_PORT='oops'"):
        load_config(write(tmp_path), env={"EDGELOOP_AGENT_MQTT_PORT": "oops"})


def test_keys_of_earlier_versions_are_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    cfg = load_config(write(tmp_path, ort_binding="capi", build_nice=19), env={})
    assert cfg.device_id == "d-1"
    assert "'ort_binding' is no longer read" in caplog.text
    assert "'build_nice' is no longer read" in caplog.text


def test_ca_bundle_is_relative_to_the_config_file_and_must_load(tmp_path: Path) -> None:
    from tests.device_agent.netkit import tls_files

    tls = tls_files(tmp_path / "tls")
    cfg = load_config(write(tmp_path, ca_bundle=str(tls.ca.relative_to(tmp_path))), env={})
    assert cfg.ca_bundle == tls.ca
    (tmp_path / "bad.pem").write_text("not a certificate")
    for name in ("missing.pem", "bad.pem"):
        with pytest.raises(ConfigError, match="not a readable PEM CA bundle"):
            load_config(write(tmp_path, ca_bundle=name), env={})
