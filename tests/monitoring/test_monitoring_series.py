"""The series the dashboard draws: each window of one (version, group), oldest first, its drift
verdict as one score against one threshold line, estimated and live accuracy against the alert
floor (``GET /api/v1/model-lines/{name}/monitoring/series``). SQLite and PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from server.monitoring.series import drift_score
from server.services import Services
from tests.monitoring.conftest import Trained, View
from tests.monitoring.dashboard_kit import DRIFTED, LABELLED, WINDOWS, monitored_line
from tests.monitoring.monitoring_kit import LINE, WINDOW_S, window_start
from tests.server.conftest import create_line

SERIES = f"/api/v1/model-lines/{LINE}/monitoring/series"


def test_a_drift_score_is_the_highest_statistic_over_its_own_threshold() -> None:
    verdict = {
        "scores": [
            {"signal": "a", "psi": 0.2, "psi_threshold": 0.1, "js": 0.1, "js_threshold": 0.2},
            {"signal": "b", "psi": 0.1, "psi_threshold": 0.2, "js": 0.9, "js_threshold": 0.3},
        ]
    }
    score = drift_score(verdict)
    assert score is not None
    assert (score.score, score.signal, score.statistic) == (pytest.approx(3.0), "b", "js")
    assert drift_score(None) is None and drift_score({"scores": []}) is None
    junk: dict[str, Any] = {
        "scores": [
            "not a score",
            {"signal": "a", "psi": None, "psi_threshold": 0.1},
            {"signal": "b", "psi": 0.5, "psi_threshold": math.inf, "js": "x", "js_threshold": 1},
        ]
    }
    assert drift_score(junk) is None


@pytest.fixture
def line(
    tmp_path: Path, db_url: str, signing_key: Any, trained: Trained, views: dict[float, View]
) -> Iterator[tuple[httpx.Client, Services, str]]:
    with monitored_line(tmp_path, db_url, signing_key, trained, views) as got:
        yield got


def test_the_series_draws_each_window_against_its_thresholds(
    line: tuple[httpx.Client, Services, str],
) -> None:
    client, _, _ = line
    default = client.get(SERIES).json()
    assert (default["version"], default["group"]) == (1, "*")  # newest version, whole fleet
    assert [(k["version"], k["group"], k["windows"]) for k in default["keys"]] == [
        (1, "*", WINDOWS),
        (1, "hall-1", WINDOWS),
        (1, "hall-2", WINDOWS),
    ]
    assert default["drift_threshold"] == 1.0 and default["window_s"] == WINDOW_S
    assert default["max_accuracy_drop"] == 0.05  # the server's alert_max_accuracy_drop

    points = client.get(SERIES, params={"version": 1, "group": "hall-1"}).json()["points"]
    assert [p["window_start"][:19] for p in points] == [
        window_start(k).isoformat()[:19] for k in range(WINDOWS)
    ]
    assert [p["drift_breach"] for p in points] == [k in DRIFTED for k in range(WINDOWS)]
    windows = client.get(
        f"/api/v1/model-lines/{LINE}/monitoring/windows", params={"version": 1, "group": "hall-1"}
    ).json()[::-1]
    for p, w in zip(points, windows, strict=True):
        scores = w["drift"]["scores"]
        top = max(s[st] / s[f"{st}_threshold"] for s in scores for st in ("psi", "js"))
        assert p["drift_score"] == pytest.approx(top)
        assert (p["drift_score"] > 1.0) is p["drift_breach"]  # one line holds every threshold
        assert p["drift_score"] >= w["drift_ratio"]  # the stored ratio is PSI's only
        assert p["drifted"] == w["drifted"] and p["breaches"] == w["breaches"]
        assert p["estimated_accuracy"] == w["estimated_accuracy"]
        assert p["estimate_trusted"] is w["estimate_trusted"] is (not w["drift_breach"])
        assert p["live_accuracy"] == w["live_accuracy"] and p["labelled"] == LABELLED
        assert p["accuracy_floor"] == pytest.approx(w["reference_accuracy"] - 0.05)
    for k, p in enumerate(points):
        drifted = k in DRIFTED
        assert (p["estimated_accuracy"] < p["accuracy_floor"]) is drifted, k
        assert (p["live_high"] < p["accuracy_floor"]) is drifted, k
        assert ("drift" in p["breaches"]) is drifted, k

    hall2 = client.get(SERIES, params={"version": 1, "group": "hall-2"}).json()["points"]
    assert len(hall2) == WINDOWS and not any(p["drift_breach"] for p in hall2)
    assert all(p["drift_score"] <= 1.0 for p in hall2)
    newest = client.get(SERIES, params={"version": 1, "group": "hall-1", "limit": 3}).json()
    assert [p["window_start"][:19] for p in newest["points"]] == [
        window_start(k).isoformat()[:19] for k in (6, 7, 8)
    ]
    quiet = client.get(SERIES, params={"version": 1, "group": "hall-9"}).json()
    assert quiet["points"] == [] and len(quiet["keys"]) == 3


def test_the_series_refuses_what_it_cannot_show(line: tuple[httpx.Client, Services, str]) -> None:
    client, _, url = line
    unknown = client.get("/api/v1/model-lines/nope/monitoring/series")
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    version = client.get(SERIES, params={"version": 9})
    assert version.status_code == 404 and "has no version 9" in version.json()["detail"]
    for bad in ({"group": "a b"}, {"limit": 0}, {"limit": 501}, {"version": -1}):
        assert client.get(SERIES, params=bad).status_code == 422, bad
    assert httpx.get(f"{url}{SERIES}").status_code == 401
    create_line(cast(Any, client), name="quiet")
    empty = client.get("/api/v1/model-lines/quiet/monitoring/series").json()
    assert (empty["version"], empty["group"], empty["keys"], empty["points"]) == (
        None,
        None,
        [],
        [],
    )
