"""Acknowledging an alert, against a real server whose alerts went through the real ingest writer
and evaluator (``dashboard_kit``: hall-1's drift alert raised, cleared, raised again) and a real
webhook receiver; SQLite and PostgreSQL.

An operator acknowledges the raised alert with a note: the API and the CLI show who and when, the
audit log records it, the webhook receives ``alert.acknowledged``, Prometheus exports it; the
alert stays raised and its training is untouched. A viewer may not; a cleared alert, an
acknowledged one and an unknown one are 409, 409 and 404. When the acknowledged alert clears and
hall-1 drifts again, the new alert is unacknowledged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from server.cli.main import app as cli_app
from tests.monitoring.conftest import Trained, View
from tests.monitoring.dashboard_kit import WINDOWS, monitored_line, play_window
from tests.monitoring.monitoring_kit import LINE, WebhookReceiver

pytestmark = pytest.mark.slow


def token(client: httpx.Client, name: str, role: str) -> str:
    r = client.post("/api/v1/operators/tokens", json={"name": name, "role": role})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["token"])


def as_(token_: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_}"}


def hall1_drift(client: httpx.Client) -> list[dict[str, Any]]:
    """hall-1's drift alerts, newest first."""
    return client.get(
        "/api/v1/alerts", params={"model_line": LINE, "group": "hall-1", "rule": "drift"}
    ).json()


def cli(url: str, tok: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli_app, ["--server", url, "--token", tok, *args], env={"COLUMNS": "250"}
    )
    return result.exit_code, result.output


def test_an_operator_acknowledges_a_raised_alert_which_stays_raised_until_it_clears(
    tmp_path: Path,
    db_url: str,
    signing_key: Any,
    trained: Trained,
    views: dict[float, View],
) -> None:
    with (
        WebhookReceiver(script=[200]) as receiver,
        monitored_line(
            tmp_path, db_url, signing_key, trained, views, alert_webhook_url=receiver.url
        ) as (client, services, url),
    ):
        raised, cleared = hall1_drift(client)
        assert (raised["state"], cleared["state"]) == ("raised", "cleared")
        assert raised["acknowledged_by"] is None and cleared["acknowledged_by"] is None
        viewer, olga = token(client, "vic", "viewer"), token(client, "olga", "operator")
        ack = f"/api/v1/alerts/{raised['id']}/acknowledge"

        refused = httpx.post(f"{url}{ack}", json={}, headers=as_(viewer))
        assert refused.status_code == 403
        assert httpx.post(f"{url}{ack}", json={}).status_code == 401
        too_long = httpx.post(f"{url}{ack}", json={"note": "x" * 1001}, headers=as_(olga))
        assert too_long.status_code == 422

        r = httpx.post(f"{url}{ack}", json={"note": "camera 1 lens fogged"}, headers=as_(olga))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["id"], body["state"], body["acknowledged_by"]) == (
            raised["id"],
            "raised",
            "olga",
        )
        assert body["ack_note"] == "camera 1 lens fogged"
        assert body["acknowledged_at"].startswith(str(services.clock().date()))

        # Once only; a cleared alert and an unknown one cannot be acknowledged.
        again = httpx.post(f"{url}{ack}", headers=as_(olga))
        assert again.status_code == 409
        assert f"alert {raised['id']} was already acknowledged by olga" in again.json()["detail"]
        late = httpx.post(f"{url}/api/v1/alerts/{cleared['id']}/acknowledge", headers=as_(olga))
        assert late.status_code == 409
        assert "cleared at" in late.json()["detail"]
        missing = httpx.post(f"{url}/api/v1/alerts/999999/acknowledge", headers=as_(olga))
        assert missing.status_code == 404 and "unknown alert 999999" in missing.json()["detail"]

        # Shown in the listing and the detail; nothing else about the alert changed.
        now_raised, now_cleared = hall1_drift(client)
        assert now_raised["acknowledged_by"] == "olga" and now_cleared["acknowledged_by"] is None
        for key in ("state", "last_window", "cleared_at", "retrain_job_id", "retrain_note"):
            assert now_raised[key] == raised[key], key
        detail = client.get(f"/api/v1/alerts/{raised['id']}").json()
        assert detail["ack_note"] == "camera 1 lens fogged"
        assert [d["event"] for d in detail["deliveries"]] == ["alert.raised", "alert.acknowledged"]

        # Audited, with the operator from the token.
        records = client.get("/api/v1/audit", params={"action": "alert.acknowledge"}).json()
        assert [(x["actor"], x["subject"]) for x in records["records"]] == [
            ("olga", f"alert:{raised['id']}")
        ]
        assert records["records"][0]["details"]["note"] == "camera 1 lens fogged"
        assert client.get("/api/v1/audit/verify").json()["ok"] is True

        # Prometheus: still active, and acknowledged.
        labels = '{group="hall-1",model_line="digits",model_version="1",rule="drift"} 1.0'
        text = httpx.get(f"{url}/metrics").text
        assert f"edgeloop_alerts_active{labels}" in text
        assert f"edgeloop_alerts_acknowledged{labels}" in text

        # The webhook receives the acknowledgement (after the queued transitions).
        while services.webhook.run_once():
            pass
        events = [x for x in receiver.received if x.json["alert"]["id"] == raised["id"]]
        assert [x.headers["X-Edgeloop-Event"] for x in events] == [
            "alert.raised",
            "alert.acknowledged",
        ]
        sent = events[-1].json
        assert sent["event"] == "alert.acknowledged" and sent["alert"]["state"] == "raised"
        assert sent["acknowledgement"]["by"] == "olga"
        assert sent["acknowledgement"]["note"] == "camera 1 lens fogged"

        # hall-1 recovers for three windows: the acknowledged alert clears as any would; it
        # drifts again for two: a new alert, not acknowledged.
        rng = np.random.default_rng(11)
        for k in range(WINDOWS, WINDOWS + 3):
            play_window(services, trained, views, k, rng, hall1_drifted=False)
        assert hall1_drift(client)[0]["state"] == "cleared"
        for k in range(WINDOWS + 3, WINDOWS + 5):
            play_window(services, trained, views, k, rng, hall1_drifted=True)
        newest, previous = hall1_drift(client)[:2]
        assert previous["id"] == raised["id"] and previous["acknowledged_by"] == "olga"
        assert newest["id"] > raised["id"] and newest["state"] == "raised"
        assert newest["acknowledged_by"] is None
        text = httpx.get(f"{url}/metrics").text
        assert f"edgeloop_alerts_active{labels}" in text  # the new one
        assert "edgeloop_alerts_acknowledged{" not in text  # the acknowledged one cleared


def test_the_cli_acknowledges_and_lists_the_acknowledgement(
    tmp_path: Path,
    db_url: str,
    signing_key: Any,
    trained: Trained,
    views: dict[float, View],
) -> None:
    with monitored_line(tmp_path, db_url, signing_key, trained, views) as (client, _, url):
        raised, cleared = hall1_drift(client)
        olga, vic = token(client, "olga", "operator"), token(client, "vic", "viewer")
        code, out = cli(url, olga, "alerts", "ack", str(raised["id"]), "--note", "on it")
        assert code == 0, out
        assert f"alert {raised['id']} drift on digits v1 group hall-1: acknowledged by olga" in out
        assert "(still raised)" in out
        code, out = cli(url, olga, "--json", "alerts", "list", "--group", "hall-1")
        assert code == 0, out
        listed = {a["id"]: a["acknowledged_by"] for a in json.loads(out)}
        assert listed[raised["id"]] == "olga" and listed[cleared["id"]] is None
        code, out = cli(url, olga, "alerts", "list", "--group", "hall-1", "--rule", "drift")
        assert code == 0 and "acknowledged_by" in out and "olga" in out
        code, out = cli(url, olga, "alerts", "show", str(raised["id"]))
        assert code == 0 and "acknowledged by olga at " in out and ": on it" in out
        code, out = cli(url, olga, "alerts", "ack", str(raised["id"]))
        assert code == 1 and "error 409" in out and "already acknowledged by olga" in out
        code, out = cli(url, olga, "alerts", "ack", str(cleared["id"]))
        assert code == 1 and "error 409" in out and "cleared" in out
        code, out = cli(url, olga, "alerts", "ack", "424242")
        assert code == 1 and "error 404" in out
        code, out = cli(url, vic, "alerts", "ack", str(raised["id"]))
        assert code == 1 and "error 403" in out
