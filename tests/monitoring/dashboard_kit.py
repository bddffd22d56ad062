"""A monitored line with a history, for the dashboard's series API and browser tests: a real
server (uvicorn in a thread, the test's clock) whose windows went through the real ingest writer
and evaluator.

Devices ``cam-1`` (group hall-1) and ``cam-2`` (hall-2) serve v1 and report a summary of 120
inferences and a metrics report of 60 labelled ones per window. hall-1's inputs drift in windows
:data:`DRIFTED` (the simulator's camera drift), so its drift alert is raised at window 3, cleared
after three clean windows (6) and raised again at window 8; hall-2 stays clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

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
    metrics,
    monitor_settings,
    register_model,
    summary,
)
from tests.server.conftest import create_line, make_settings
from tests.server.live_server import LiveServer

WINDOWS = 9  # windows 0..8
DRIFTED = (2, 3, 7, 8)  # hall-1's drifted windows
SAMPLES = 120  # inferences per device summary
LABELLED = 60  # labelled inferences per device metrics report


def play_window(
    services: Services,
    trained: Trained,
    views: dict[float, View],
    k: int,
    rng: np.random.Generator,
    *,
    hall1_drifted: bool,
) -> None:
    """Window ``k`` of the history: both devices report, the window closes, the evaluator
    records it (the test's clock moves to its close)."""
    hall1 = views[1.0] if hall1_drifted else views[0.0]
    reports = [
        summary(trained.reference, hall1, "cam-1", SAMPLES, rng),
        summary(trained.reference, views[0.0], "cam-2", SAMPLES, rng),
        metrics(
            "cam-1",
            inferences=SAMPLES,
            labelled=LABELLED,
            correct=round(LABELLED * hall1.accuracy),
        ),
        metrics(
            "cam-2",
            inferences=SAMPLES,
            labelled=LABELLED,
            correct=round(LABELLED * views[0.0].accuracy),
        ),
    ]
    ingest(services, inside(k), reports)
    services.clock.set(closed(k))  # type: ignore[attr-defined]
    assert services.monitor.run_once() == 1


@contextmanager
def monitored_line(
    tmp_path: Path,
    db_url: str,
    signing_key: Any,
    trained: Trained,
    views: dict[float, View],
    *,
    line_config: dict[str, Any] | None = None,
    **overrides: Any,
) -> Iterator[tuple[httpx.Client, Services, str]]:
    """(an admin client, the services, the server's URL) after the history above.

    ``line_config``: the line's training config (e.g. a ``capture`` table); ``overrides``:
    settings (e.g. ``alert_webhook_url``)."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, db_url, signing_key_path=priv, **{**monitor_settings(), **overrides}
    )
    clock = FakeClock()
    services = build_services(settings, clock=clock)
    with LiveServer(create_app(settings, services=services)) as srv:
        client = httpx.Client(base_url=srv.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30)
        try:
            if line_config is None:
                create_line(cast(Any, client))
            else:
                config = {"trainer": "sklearn-mlp", **line_config}
                create_line(cast(Any, client), trainer=None, config=config)
            register_model(services, trained.onnx, version=1)
            enroll(client, "cam-1", LINE, groups=["hall-1"])
            enroll(client, "cam-2", LINE, groups=["hall-2"])
            rng = np.random.default_rng(7)
            for k in range(WINDOWS):
                play_window(services, trained, views, k, rng, hall1_drifted=k in DRIFTED)
            yield client, services, srv.url
        finally:
            client.close()
