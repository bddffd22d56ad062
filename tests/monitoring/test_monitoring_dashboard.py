"""The dashboard's monitoring panels in headless Chromium, against a real server whose windows
went through the real ingest writer and evaluator (``dashboard_kit``: hall-1 drifts twice, hall-2
stays clean).

Signed in as a viewer, the page shows each (version, group)'s drift score against its threshold
line and estimated and live accuracy against the alert floor, with the same values as the API,
and lists every alert with its state. An operator acknowledges a raised alert with a click (a
viewer's button is disabled), and the labelling panel shows the queue, the labels by source and
the capture policies in force as the API does. Screenshots are saved to the test's tmp dir and to
``$EDGELOOP_TEST_ARTIFACTS`` (default ``var/test-artifacts``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.monitoring.conftest import Trained, View
from tests.monitoring.dashboard_kit import DRIFTED, LABELLED, WINDOWS, monitored_line
from tests.monitoring.monitoring_kit import LINE
from tests.server.conftest import sample

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("EDGELOOP_TEST_ARTIFACTS", "var/test-artifacts"))
SERIES = f"/api/v1/model-lines/{LINE}/monitoring/series"


@pytest.fixture
def browser_page() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/setup.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def utc(iso: str | None) -> str:
    """An API time as the dashboard writes it."""
    if iso is None:
        return "–"
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S UTC")


def test_the_dashboard_draws_drift_and_accuracy_against_thresholds_and_lists_alerts(
    tmp_path: Path,
    signing_key: Any,
    trained: Trained,
    views: dict[float, View],
    browser_page: Any,
) -> None:
    db = f"sqlite:///{tmp_path}/edgeloop.db"
    with monitored_line(tmp_path, db, signing_key, trained, views) as (client, _, url):
        viewer = client.post(
            "/api/v1/operators/tokens", json={"name": "vic", "role": "viewer"}
        ).json()["token"]
        page = browser_page
        page.goto(f"{url}/")
        page.fill("#token", viewer)
        page.dispatch_event("#token", "change")
        page.wait_for_function(
            "document.querySelector('#whoami').textContent === 'vic (viewer)'", timeout=30_000
        )

        # The selector offers every (version, group) with windows; the whole fleet comes first.
        page.wait_for_function(
            "document.querySelectorAll('#monitor-key option').length === 3", timeout=30_000
        )
        options = page.locator("#monitor-key option")
        assert options.all_inner_texts() == ["v1 · all devices", "v1 · hall-1", "v1 · hall-2"]
        assert page.locator("#monitor-key").input_value() == "1|*"

        # hall-1: one point per window, the drifted windows above the threshold line.
        page.select_option("#monitor-key", "1|hall-1")
        series = client.get(SERIES, params={"version": 1, "group": "hall-1"}).json()
        points = series["points"]
        assert len(points) == WINDOWS
        page.wait_for_function(
            "document.querySelectorAll('#chart-drift circle.breach').length === "
            f"{len(DRIFTED)} && document.querySelector('#monitor-latest').textContent"
            ".includes('breach')",
            timeout=30_000,
        )
        drift = page.locator("#chart-drift circle.pt")
        assert drift.count() == WINDOWS
        shown = [
            (float(drift.nth(i).get_attribute("data-v")), drift.nth(i).get_attribute("data-breach"))
            for i in range(WINDOWS)
        ]
        assert shown == [
            (pytest.approx(p["drift_score"]), "true" if k in DRIFTED else "false")
            for k, p in enumerate(points)
        ]
        threshold = page.locator("#chart-drift line.threshold")
        assert threshold.count() == 1 and threshold.get_attribute("data-y") == "1"
        assert page.locator("#chart-drift text.threshold-label").text_content() == "threshold 1"
        # The line sits where the axis puts 1: between the drifted points and the clean ones.
        line_y = float(threshold.get_attribute("y1"))
        ys = [float(drift.nth(i).get_attribute("cy")) for i in range(WINDOWS)]
        assert all((y < line_y) is (k in DRIFTED) for k, y in enumerate(ys))  # SVG y grows down

        # Accuracy: estimated and live per window, the reference and the alert floor drawn.
        last = points[-1]
        for name, key in (
            ("estimated", "estimated_accuracy"),
            ("live (labelled)", "live_accuracy"),
        ):
            dots = page.locator(f"#chart-monitor-accuracy circle.pt[data-series='{name}']")
            assert [float(v) for v in dots.evaluate_all("ds => ds.map(d => d.dataset.v)")] == [
                pytest.approx(p[key]) for p in points
            ]
        # An estimate of a drifted window cannot be trusted: its dot is drawn hollow.
        hollow = page.locator("#chart-monitor-accuracy circle.pt[data-series='estimated']")
        assert hollow.evaluate_all("ds => ds.map(d => d.dataset.untrusted)") == [
            "true" if k in DRIFTED else "false" for k in range(WINDOWS)
        ]
        assert [p["estimate_trusted"] for p in points] == [k not in DRIFTED for k in range(WINDOWS)]
        floor = page.locator("#chart-monitor-accuracy line.threshold")
        assert float(floor.get_attribute("data-y")) == pytest.approx(last["accuracy_floor"])
        assert page.locator("#chart-monitor-accuracy text.threshold-label").text_content() == (
            f"alert floor {last['accuracy_floor']:.3f}"
        )
        reference = page.locator("#chart-monitor-accuracy line.reference")
        assert float(reference.get_attribute("data-y")) == pytest.approx(last["reference_accuracy"])
        latest = page.locator("#monitor-latest")
        assert (
            latest.locator("[data-k='drift']")
            .inner_text()
            .startswith(f"drift score {last['drift_score']:.2f} (threshold 1, breach: ")
        )
        assert last["estimate_trusted"] is False  # the last hall-1 window drifted
        assert latest.locator("[data-k='estimated']").inner_text() == (
            f"estimated accuracy {last['estimated_accuracy']:.3f} (unreliable: the inputs drifted)"
        )
        assert latest.locator("[data-k='live']").inner_text() == (
            f"live accuracy {last['live_accuracy']:.3f} ({LABELLED} labels)"
        )

        # hall-2 stayed clean: no point above the line.
        page.select_option("#monitor-key", "1|hall-2")
        page.wait_for_function(
            "document.querySelector('#monitor-latest').textContent.includes('from 1 devices') &&"
            "!document.querySelector('#monitor-latest').textContent.includes('breach')",
            timeout=30_000,
        )
        assert page.locator("#chart-drift circle.pt").count() == WINDOWS
        assert page.locator("#chart-drift circle.breach").count() == 0
        assert page.locator("#chart-monitor-accuracy circle.untrusted").count() == 0

        # Alerts: every one the API lists, newest first, with its state and times.
        alerts = client.get("/api/v1/alerts", params={"model_line": LINE}).json()
        assert {(a["rule"], a["group"], a["state"]) for a in alerts} >= {
            ("drift", "hall-1", "cleared"),
            ("drift", "hall-1", "raised"),
        }
        page.wait_for_function(
            f"document.querySelectorAll('#alerts tbody tr[data-alert-id]').length === "
            f"{len(alerts)}",
            timeout=30_000,
        )
        rows = page.locator("#alerts tbody tr")
        for i, a in enumerate(alerts):
            row = rows.nth(i)
            assert row.get_attribute("data-alert-id") == str(a["id"])
            cells = row.locator("td").evaluate_all("tds => tds.map(t => t.textContent.trim())")
            group = "all devices" if a["group"] == "*" else a["group"]
            assert cells[:5] == [f"#{a['id']}", a["state"], a["rule"], "v1", group]
            assert cells[6:8] == [utc(a["raised_at"]), utc(a["cleared_at"])]
            assert (cells[7] == "–") is (a["state"] == "raised")
        # The hall-1 drift alert that cleared shows when; hall-2 never alerted.
        assert not any(a["group"] == "hall-2" for a in alerts)

        page.select_option("#monitor-key", "1|hall-1")
        page.wait_for_function(
            f"document.querySelectorAll('#chart-drift circle.breach').length === {len(DRIFTED)}",
            timeout=30_000,
        )
        page.evaluate("window.scrollTo(0, 0)")  # bounding boxes below are page coordinates
        shot = tmp_path / "dashboard-monitoring.png"
        page.screenshot(path=str(shot), full_page=True)
        # The monitoring panels and the alerts alone (docs/dashboard-monitoring.png).
        top = page.locator("#monitoring").bounding_box()
        bottom = page.locator("#alerts").bounding_box()
        assert top is not None and bottom is not None
        panels = tmp_path / "dashboard-monitoring-panels.png"
        page.screenshot(
            path=str(panels),
            full_page=True,
            clip={
                "x": top["x"],
                "y": top["y"],
                "width": top["width"],
                "height": bottom["y"] + bottom["height"] - top["y"],
            },
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for png in (shot, panels):
            assert png.stat().st_size > 10_000
            shutil.copy(png, ARTIFACTS / png.name)
        assert httpx.get(f"{url}/ui/").status_code == 200


CAPTURE = {
    "on_alerts": ["drift"],
    "uncertain_below": 0.9,
    "sample_rate": 0.5,
    "max_per_hour": 500,
    "max_per_day": 2000,
    "ttl_s": 3600,
}


def sign_in(page: Any, token: str, who: str) -> None:
    page.fill("#token", token)
    page.dispatch_event("#token", "change")
    page.wait_for_function(
        f"document.querySelector('#whoami').textContent === {who!r}", timeout=30_000
    )


def test_an_operator_acknowledges_an_alert_and_the_labelling_panel_matches_the_api(
    tmp_path: Path,
    signing_key: Any,
    trained: Trained,
    views: dict[float, View],
    browser_page: Any,
) -> None:
    """A viewer sees the Ack button disabled; an operator clicks it, types a note, and the row
    shows who acknowledged it while the alert stays raised. The labelling panel shows the
    line's queue, its labels by source and the capture policies in force as the API does."""
    db = f"sqlite:///{tmp_path}/edgeloop.db"
    with monitored_line(
        tmp_path, db, signing_key, trained, views, line_config={"capture": CAPTURE}
    ) as (client, services, url):
        # Labelling: the drifting groups get raised capture policies; cam-1 sends six samples
        # without a label and two with one; an operator labels two of the six.
        assert services.capture is not None
        issued = services.capture.run_once()
        assert issued and all(p.raised for p in issued)
        samples = [
            {**sample("cam-1", sample_id=f"u-{i}", true_label=i), "true_label": None}
            for i in range(6)
        ] + [sample("cam-1", sample_id=f"d-{i}", true_label=i) for i in range(2)]
        r = client.post("/api/v1/samples", json={"samples": samples})
        assert r.status_code == 200 and r.json()["accepted"] == 8, r.text
        export = [
            {
                "id": i,
                "data": {"sample_id": f"u-{i}"},
                "annotations": [{"result": [{"value": {"choices": [str(i)]}}]}],
            }
            for i in range(2)
        ]
        assert client.post("/api/v1/labels/import", json=export).json()["labelled"] == 2
        summary = client.get(f"/api/v1/model-lines/{LINE}/labelling-summary").json()
        assert summary["queued"] == 4 and summary["labelled"]["operator"] == 2
        assert {p["group"] for p in summary["capture_policies"]} == {p.group for p in issued}

        viewer = client.post(
            "/api/v1/operators/tokens", json={"name": "vic", "role": "viewer"}
        ).json()["token"]
        operator = client.post(
            "/api/v1/operators/tokens", json={"name": "olga", "role": "operator"}
        ).json()["token"]
        page = browser_page
        page.goto(f"{url}/")
        sign_in(page, viewer, "vic (viewer)")

        # The labelling panel: the API's numbers, one row for the line.
        row = page.locator(f"#labelling tbody tr[data-line='{LINE}']")
        row.wait_for(timeout=30_000)
        cell = lambda k: row.locator(f"td[data-k='{k}']").inner_text()  # noqa: E731
        assert int(cell("queued")) == summary["queued"]
        assert int(cell("device")) == summary["labelled"]["device"]
        assert int(cell("operator")) == summary["labelled"]["operator"]
        policies = row.locator("td[data-k='policies'] span[data-group]")
        assert policies.count() == len(summary["capture_policies"])
        for i, p in enumerate(summary["capture_policies"]):
            shown = policies.nth(i)
            assert shown.get_attribute("data-group") == p["group"]
            group = "all devices" if p["group"] == "*" else p["group"]
            assert shown.inner_text() == (
                f"{group}: rate {p['sample_rate']:.2f} below {p['uncertain_below']:.2f} "
                f"until {utc(p['expires_at'])}"
            )

        # The raised hall-1 drift alert: a viewer's Ack button is disabled.
        raised = client.get(
            "/api/v1/alerts",
            params={"model_line": LINE, "group": "hall-1", "rule": "drift", "state": "raised"},
        ).json()[0]
        alert_row = page.locator(f"#alerts tbody tr[data-alert-id='{raised['id']}']")
        alert_row.wait_for(timeout=30_000)
        button = alert_row.locator("button[data-ack]")
        assert button.is_disabled() and button.get_attribute("title") == "needs the operator role"
        assert alert_row.get_attribute("data-acked") == "false"
        # Cleared alerts offer no button.
        assert page.locator("#alerts tr[data-state='cleared'] button[data-ack]").count() == 0

        # Signed in as an operator: click Ack, type a note, the row shows who.
        sign_in(page, operator, "olga (operator)")
        page.wait_for_function(
            f"!document.querySelector(\"#alerts tr[data-alert-id='{raised['id']}'] "
            'button[data-ack]").disabled',
            timeout=30_000,
        )
        page.once("dialog", lambda d: d.accept("lens fogged, cleaning it"))
        alert_row.locator("button[data-ack]").click()
        page.wait_for_function(
            f"document.querySelector(\"#alerts tr[data-alert-id='{raised['id']}']\")"
            ".dataset.acked === 'true'",
            timeout=30_000,
        )
        acked = client.get(f"/api/v1/alerts/{raised['id']}").json()
        assert (acked["state"], acked["acknowledged_by"]) == ("raised", "olga")
        assert acked["ack_note"] == "lens fogged, cleaning it"
        cells = alert_row.locator("td").evaluate_all("tds => tds.map(t => t.textContent.trim())")
        assert cells[1] == "raised"
        assert cells[9] == f"olga {utc(acked['acknowledged_at'])}"
        assert alert_row.locator(".acked").get_attribute("title") == "lens fogged, cleaning it"
        assert alert_row.locator("button[data-ack]").count() == 0

        shot = tmp_path / "dashboard-alert-ack.png"
        page.screenshot(path=str(shot), full_page=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ARTIFACTS / shot.name)

        # The policies expire: the panel says so.
        services.clock.set(  # type: ignore[attr-defined]
            max(datetime.fromisoformat(p["expires_at"]) for p in summary["capture_policies"])
        )
        assert (
            client.get(f"/api/v1/model-lines/{LINE}/labelling-summary").json()["capture_policies"]
            == []
        )
        page.wait_for_function(
            f"document.querySelector(\"#labelling tr[data-line='{LINE}'] td[data-k='policies']\")"
            ".dataset.count === '0'",
            timeout=30_000,
        )
        assert cell("policies") == "none (devices on their default)"
