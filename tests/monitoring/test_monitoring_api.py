"""Alerts and monitoring windows where operators see them: the API (filters, detail, errors),
the CLI (``edgeloop alerts list|show|windows``, tables and ``--json``) against a real uvicorn
server, and the Prometheus gauges on /metrics. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from server.cli.main import app as cli_app
from server.main import create_app
from server.services import Services, build_services
from tests.authkit import FleetAuth, enroll
from tests.conftest import TEST_ADMIN_TOKEN, write_key_pair
from tests.monitoring.conftest import Trained, View
from tests.monitoring.monitoring_kit import (
    LINE,
    FakeClock,
    closed,
    ingest,
    inside,
    monitor_settings,
    register_model,
    summary,
    window_start,
)
from tests.server.conftest import create_line, make_settings
from tests.server.live_server import LiveServer


@pytest.fixture
def live(
    tmp_path: Path, db_url: str, signing_key: Any, trained: Trained, views: dict[float, View]
) -> Iterator[tuple[httpx.Client, Services]]:
    """A real server whose hall-1 drifted for two windows (a drift alert for hall-1 and the
    version's fleet) while hall-2 stayed clean."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(tmp_path, db_url, signing_key_path=priv, **monitor_settings())
    clock = FakeClock()
    services = build_services(settings, clock=clock)
    with LiveServer(create_app(settings, services=services)) as srv:
        client = httpx.Client(base_url=srv.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30)
        create_line(cast(Any, client))
        register_model(services, trained.onnx, version=1)
        enroll(client, "cam-1", LINE, groups=["hall-1"])
        enroll(client, "cam-2", LINE, groups=["hall-2"])
        rng = np.random.default_rng(2)
        for k in range(2):
            reports = [
                summary(trained.reference, views[1.0], "cam-1", 120, rng),
                summary(trained.reference, views[0.0], "cam-2", 120, rng),
            ]
            ingest(services, inside(k), reports)
            clock.set(closed(k))
            assert services.monitor.run_once() == 1
        yield client, services
        client.close()


def cli(url: str, *args: str, token: str = TEST_ADMIN_TOKEN) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli_app, ["--server", url, "--token", token, *args], env={"COLUMNS": "250"}
    )
    return result.exit_code, result.output


def test_the_api_lists_filters_and_shows_alerts_and_windows(
    live: tuple[httpx.Client, Services],
) -> None:
    client, _ = live
    everything = client.get("/api/v1/alerts").json()
    # The drift lowers the model's confidence too: the label-free estimate falls with it.
    assert {(a["rule"], a["group"], a["state"]) for a in everything} == {
        (rule, group, "raised")
        for rule in ("drift", "estimated_accuracy")
        for group in ("*", "hall-1")
    }
    assert [a["id"] for a in everything] == sorted((a["id"] for a in everything), reverse=True)
    hall = client.get("/api/v1/alerts", params={"group": "hall-1", "rule": "drift"}).json()
    assert len(hall) == 1 and hall[0]["model_version"] == 1
    assert client.get("/api/v1/alerts", params={"group": "*"}).json()[0]["group"] == "*"
    assert client.get("/api/v1/alerts", params={"group": "hall-2"}).json() == []
    assert client.get("/api/v1/alerts", params={"state": "cleared"}).json() == []
    assert client.get("/api/v1/alerts", params={"model_version": 2}).json() == []
    assert len(client.get("/api/v1/alerts", params={"model_line": LINE, "limit": 1}).json()) == 1
    for bad in ({"state": "burning"}, {"rule": "vibes"}, {"group": "a b"}, {"limit": 0}):
        assert client.get("/api/v1/alerts", params=bad).status_code == 422, bad

    detail = client.get(f"/api/v1/alerts/{hall[0]['id']}").json()
    assert detail["first_window"].startswith("2030-01-01T00:00:00")
    assert detail["figures"]["samples"] == 120 and detail["figures"]["drift"]["breach"] is True
    assert detail["deliveries"] == []  # no webhook configured
    missing = client.get("/api/v1/alerts/999999")
    assert missing.status_code == 404 and "unknown alert 999999" in missing.json()["detail"]
    anonymous = httpx.get(f"{client.base_url}/api/v1/alerts")
    assert anonymous.status_code == 401

    windows = client.get(
        f"/api/v1/model-lines/{LINE}/monitoring/windows", params={"version": 1, "group": "hall-2"}
    ).json()
    assert [w["window_start"][:19] for w in windows] == [
        window_start(1).isoformat()[:19],
        window_start(0).isoformat()[:19],
    ]
    w = windows[0]
    assert (w["group"], w["devices"], w["samples"], w["drift_breach"]) == ("hall-2", 1, 120, False)
    assert w["breaches"] == [] and 0 < w["estimated_accuracy"] <= 1
    assert w["estimate_trusted"] is True  # no drift: the estimate holds
    drifted = client.get(
        f"/api/v1/model-lines/{LINE}/monitoring/windows", params={"version": 1, "group": "hall-1"}
    ).json()
    assert [(x["drift_breach"], x["estimate_trusted"]) for x in drifted] == [(True, False)] * 2
    scores = w["drift"]["scores"]
    assert {s["signal"] for s in scores} >= {"confidence", "input_std", "predicted"}
    assert all(s["psi"] <= s["psi_threshold"] and s["js"] <= s["js_threshold"] for s in scores)
    everything = client.get(f"/api/v1/model-lines/{LINE}/monitoring/windows").json()
    assert {x["group"] for x in everything} == {"*", "hall-1", "hall-2"} and len(everything) == 6
    assert client.get("/api/v1/model-lines/nope/monitoring/windows").status_code == 404


def test_the_cli_lists_and_shows_alerts(live: tuple[httpx.Client, Services]) -> None:
    client, _ = live
    url = str(client.base_url).rstrip("/")
    code, out = cli(url, "alerts", "list", "--line", LINE, "--group", "hall-1")
    assert code == 0, out
    assert "drift" in out and "hall-1" in out and "raised" in out
    code, out = cli(url, "--json", "alerts", "list", "--state", "raised", "--rule", "drift")
    assert code == 0, out
    listed = json.loads(out)
    assert {a["group"] for a in listed} == {"*", "hall-1"}
    alert_id = next(a["id"] for a in listed if a["group"] == "hall-1")
    code, out = cli(url, "alerts", "show", str(alert_id))
    assert code == 0, out
    assert f"alert {alert_id} drift raised" in out and "input_std" in out
    code, out = cli(url, "--json", "alerts", "show", str(alert_id))
    assert code == 0 and json.loads(out)["figures"]["samples"] == 120
    code, out = cli(url, "alerts", "windows", LINE, "--group", "hall-2")
    assert code == 0 and "hall-2" in out
    code, out = cli(url, "alerts", "show", "424242")
    assert code == 1 and "unknown alert 424242" in out
    code, out = cli(url, "alerts", "list", "--state", "nonsense")
    assert code == 1 and "error 422" in out
    code, out = cli(url, "alerts", "list", token="wrong")
    assert code == 1 and "error 401" in out


def test_prometheus_exports_active_alerts_and_the_latest_window(
    live: tuple[httpx.Client, Services],
) -> None:
    client, services = live
    text = httpx.get(f"{client.base_url}/metrics").text
    active = (
        'edgeloop_alerts_active{group="hall-1",model_line="digits",model_version="1",'
        'rule="drift"} 1.0'
    )
    assert active in text
    assert 'edgeloop_alerts_active{group="hall-2"' not in text
    ratio = [
        line
        for line in text.splitlines()
        if line.startswith("edgeloop_monitor_drift_ratio{") and 'group="hall-1"' in line
    ]
    assert len(ratio) == 1 and float(ratio[0].rsplit(" ", 1)[1]) > 1.0
    assert (
        'edgeloop_monitor_window_samples{group="*",model_line="digits",model_version="1"} 240.0'
        in text
    )
    assert "edgeloop_monitor_estimated_accuracy{" in text
    trusted = 'edgeloop_monitor_estimate_trusted{group="%s",model_line="digits",model_version="1"}'
    assert f"{trusted % 'hall-1'} 0.0" in text and f"{trusted % 'hall-2'} 1.0" in text
    assert "edgeloop_ingest_monitor_written_total{" in text
    assert "edgeloop_monitor_windows_evaluated_total{" in text
    # A version that stopped reporting drops out of the window gauges (its alert stays).
    services.clock.set(closed(10))  # type: ignore[attr-defined]
    text = httpx.get(f"{client.base_url}/metrics").text
    assert "edgeloop_monitor_drift_ratio{" not in text and active in text
