"""The evaluator end to end on a real database (SQLite and PostgreSQL): summaries and metrics
written by the ingest writer, windows closed by the server's (test-set) clock, scored against
the real first model's reference, alerts raised and cleared with hysteresis.

Devices: cam-1 and cam-2 in group hall-1, cam-3 and cam-4 in hall-2. Each window every device
sends one summary of 60 inferences, so each group has 120 per window (the drift rule needs 100).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.db.monitoring import Alert, AlertStateRow, MonitorCursor, MonitorWindow
from server.db.registry import TrainingJob
from server.main import create_app
from server.services import Services, build_services
from tests.authkit import enroll
from tests.conftest import write_key_pair
from tests.monitoring.conftest import Trained, View
from tests.monitoring.monitoring_kit import (
    LINE,
    FakeClock,
    closed,
    ingest,
    inside,
    metrics,
    monitor_settings,
    register_model,
    summary,
    window_start,
)
from tests.server.conftest import authed_client, create_line, make_settings, services_of

HALLS = {"hall-1": ("cam-1", "cam-2"), "hall-2": ("cam-3", "cam-4")}


@pytest.fixture
def fleet(
    tmp_path: Path, db_url: str, signing_key: Any, trained: Trained
) -> Iterator[tuple[TestClient, FakeClock]]:
    """An app on the test clock with the digits line, the real model as v1, four devices."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(tmp_path, db_url, signing_key_path=priv, **monitor_settings())
    clock = FakeClock()
    app = create_app(settings, services=build_services(settings, clock=clock))
    with authed_client(app) as client:
        create_line(client, config={"trainer": "sklearn-mlp"}, trainer=None)
        register_model(services_of(client), trained.onnx, version=1)
        for hall, devices in HALLS.items():
            for d in devices:
                enroll(client, d, LINE, groups=[hall])
        yield client, clock


def send_window(
    services: Services,
    trained: Trained,
    k: int,
    views: dict[str, View],
    rng: np.random.Generator,
    n: int = 60,
) -> None:
    """Window ``k``: every device of each hall in ``views`` sends a summary of ``n``."""
    reports = [
        summary(trained.reference, view, d, n, rng)
        for hall, view in views.items()
        for d in HALLS[hall]
    ]
    ingest(services, inside(k), reports)


def evaluate(services: Services, clock: FakeClock, k: int) -> int:
    clock.set(closed(k))
    return services.monitor.run_once()


def rows(services: Services, model: Any, *where: Any) -> list[Any]:
    with services.sessions() as session:
        return list(session.scalars(select(model).where(*where).order_by(model.id)))


def alerts(services: Services) -> dict[tuple[str, str], Alert]:
    return {(a.rule, a.group_name): a for a in rows(services, Alert)}


def test_a_drifted_group_raises_a_clean_one_stays_silent_and_the_alert_clears(
    fleet: tuple[TestClient, FakeClock], trained: Trained, views: dict[float, View]
) -> None:
    client, clock = fleet
    services = services_of(client)
    rng = np.random.default_rng(5)
    clean, drifted = views[0.0], views[1.0]
    # Nothing received yet: no window to evaluate, the cursor waits at the current window.
    assert evaluate(services, clock, -1) == 0

    # Windows 0 and 1: hall-1 drifted, hall-2 clean. One breaching window raises nothing (k=2).
    send_window(services, trained, 0, {"hall-1": drifted, "hall-2": clean}, rng)
    assert services.ingest.stats.monitor_written == 4
    assert evaluate(services, clock, 0) == 1
    assert alerts(services) == {}
    w0 = {w.group_name: w for w in rows(services, MonitorWindow)}
    assert set(w0) == {"*", "hall-1", "hall-2"}
    assert (w0["hall-1"].devices, w0["hall-1"].summaries, w0["hall-1"].samples) == (2, 2, 120)
    assert w0["*"].samples == 240 and w0["hall-1"].window_start == window_start(0)
    assert w0["hall-1"].drift_breach is True and "drift" in w0["hall-1"].breaches
    assert w0["hall-1"].drift_ratio > 1.0 and "input_std" in w0["hall-1"].drifted
    assert w0["hall-2"].drift_breach is False and w0["hall-2"].breaches == []
    # The label-free estimate beside it, with its interval and the holdout's accuracy.
    est = w0["hall-2"]
    assert est.estimated_low <= est.estimated_accuracy <= est.estimated_high
    assert (
        est.reference_accuracy is not None
        and abs(est.estimated_accuracy - est.reference_accuracy) < 0.05
    )

    send_window(services, trained, 1, {"hall-1": drifted, "hall-2": clean}, rng)
    assert evaluate(services, clock, 1) == 1
    raised = alerts(services)
    assert ("drift", "hall-1") in raised and ("drift", "*") in raised  # half the fleet drifted
    assert not [key for key in raised if key[1] == "hall-2"]  # the clean group: silent
    a = raised[("drift", "hall-1")]
    assert (a.state, a.model_line, a.model_version) == ("raised", LINE, 1)
    assert (a.first_window, a.last_window) == (window_start(0), window_start(1))
    assert a.raised_at == closed(1) and a.samples == 120 and (a.value or 0) > 1.0
    assert "input_std" in a.figures["drift"]["drifted"]
    # The line's config lists no rule for retraining: no job, no note.
    assert a.retrain_job_id is None and a.retrain_note is None
    assert rows(services, TrainingJob) == []
    # No webhook configured: nothing queued.
    assert services.monitor.config.webhook is False

    # Window 2: nobody reports. Window 3 clean; window 4 drifted but with too few samples
    # (neither breaks nor extends the clean streak); windows 5 and 6 clean: cleared after the
    # third clean window with enough samples.
    send_window(services, trained, 3, {"hall-1": clean}, rng)
    assert evaluate(services, clock, 3) == 1  # window 2 skipped: empty
    send_window(services, trained, 4, {"hall-1": drifted}, rng, n=20)
    assert evaluate(services, clock, 4) == 1
    w4 = rows(services, MonitorWindow, MonitorWindow.window_start == window_start(4))
    assert {w.group_name: w.samples for w in w4} == {"*": 40, "hall-1": 40}
    send_window(services, trained, 5, {"hall-1": clean}, rng)
    assert evaluate(services, clock, 5) == 1
    assert alerts(services)[("drift", "hall-1")].state == "raised"  # two clean windows: not yet
    send_window(services, trained, 6, {"hall-1": clean}, rng)
    assert evaluate(services, clock, 6) == 1
    now = alerts(services)
    assert now[("drift", "hall-1")].state == "cleared"
    assert now[("drift", "hall-1")].cleared_window == window_start(6)
    assert now[("drift", "hall-1")].last_window == window_start(1)
    assert now[("drift", "*")].state == "cleared"
    state = rows(
        services,
        AlertStateRow,
        AlertStateRow.rule == "drift",
        AlertStateRow.group_name == "hall-1",
    )[0]
    assert (state.active, state.breaching, state.clean, state.skipped) == (False, 0, 3, 1)
    assert state.alert_id is None
    # Each window is evaluated once: a second pass finds nothing.
    assert services.monitor.run_once() == 0
    with services.sessions() as session:
        cursor = session.get(MonitorCursor, LINE)
        assert cursor is not None and cursor.next_window_start == window_start(7)


def test_latency_error_rate_and_live_accuracy_come_from_metrics_reports(
    fleet: tuple[TestClient, FakeClock], trained: Trained, views: dict[float, View]
) -> None:
    """hall-2 serves clean traffic but slowly, with errors, and its labels say it is wrong
    60 % of the time: latency raises after 3 windows, error rate and live accuracy after 2.
    hall-1 is healthy on every count and raises nothing."""
    client, clock = fleet
    services = services_of(client)
    rng = np.random.default_rng(9)
    for k in range(3):
        reports: list[Any] = []
        for d in HALLS["hall-1"]:
            reports.append(summary(trained.reference, views[0.0], d, 60, rng))
            reports.append(metrics(d, inferences=100, labelled=60, correct=58, p95_ms=4.0))
        for d in HALLS["hall-2"]:
            reports.append(summary(trained.reference, views[0.0], d, 60, rng))
            reports.append(
                metrics(d, inferences=100, errors=10, labelled=60, correct=24, p95_ms=400.0)
            )
        ingest(services, inside(k), reports)
        evaluate(services, clock, k)
        raised = {rule for rule, group in alerts(services) if group == "hall-2"}
        expected = {0: set(), 1: {"error_rate", "live_accuracy"}}.get(
            k, {"error_rate", "live_accuracy", "latency"}
        )
        assert raised == expected, k
    assert not [key for key in alerts(services) if key[1] == "hall-1"]
    w = rows(
        services,
        MonitorWindow,
        MonitorWindow.group_name == "hall-2",
        MonitorWindow.window_start == window_start(2),
    )[0]
    assert (w.inferences, w.errors, w.labelled) == (200, 20, 120)
    assert w.live_accuracy == pytest.approx(0.4) and w.live_high < w.reference_accuracy - 0.05
    assert w.latency_p95_ms == pytest.approx(400.0)
    assert sorted(w.breaches) == ["error_rate", "latency", "live_accuracy"]
