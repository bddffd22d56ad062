"""schemathesis against the server's own OpenAPI schema, over real HTTP: no 5xx, ever.

The server runs under uvicorn (in a thread, real sockets) on SQLite, seeded with a model line,
a champion and a candidate, an enrolled device, a rollout, a sample and a training job. Each
generated case is sent twice: as generated (random ids: mostly 404/422 paths), and again with
its path parameters replaced by the seeded ones, so the handlers behind the 404 run on hostile
bodies and query strings too. Device routes carry the seeded device's credential, everything
else the admin operator token. The only check is ``not_a_server_error``: any 5xx fails.

The same check as a command, against a running server (the README quotes its result)::

    st run http://127.0.0.1:8000/openapi.json -c not_a_server_error -n 100 --seed 2 \\
        -H "Authorization: Bearer $EDGELOOP_ADMIN_TOKEN"
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from server.db.monitoring import Alert, MonitorWindow, WebhookDelivery  # noqa: E402
from server.main import create_app  # noqa: E402
from tests.authkit import bootstrap_token  # noqa: E402
from tests.conftest import TEST_ADMIN_TOKEN, auth_headers  # noqa: E402
from tests.server.conftest import add_version, make_settings, sample  # noqa: E402
from tests.server.live_server import LiveServer  # noqa: E402

# Examples per operation and pass (bounded: the whole module stays around two minutes on 2 cores).
MAX_EXAMPLES = int(os.environ.get("EDGELOOP_SCHEMATHESIS_EXAMPLES", "25"))
DEVICE = "fuzz-cam-1"


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    app = create_app(make_settings(tmp, f"sqlite:///{tmp}/edgeloop.db"))
    srv = LiveServer(app).start()
    admin = auth_headers(TEST_ADMIN_TOKEN)
    ids: dict[str, Any] = {}
    with httpx.Client(base_url=srv.url, headers=admin, timeout=30) as http:
        from server.services import DIGITS_INPUT_SPEC, DIGITS_LABELS

        resp = http.post(
            "/api/v1/model-lines",
            json={
                "name": "digits",
                "trainer": "sklearn-mlp",
                "input_spec": DIGITS_INPUT_SPEC,
                "labels": DIGITS_LABELS,
                "initial_training": False,
            },
        )
        assert resp.status_code == 201, resp.text
        services = app.state.services
        add_version(services, version=1, status="champion", champion_release=True)
        add_version(services, version=2, status="candidate")
        token = bootstrap_token(http)
        resp = http.post(
            "/api/v1/devices/enroll",
            json={"bootstrap_token": token, "device_id": DEVICE, "model_line": "digits"},
        )
        assert resp.status_code == 201, resp.text
        credential = resp.json()["credential"]
        resp = http.post(
            "/api/v1/samples",
            json={
                "samples": [
                    sample(DEVICE, sample_id="fuzz-s1"),
                    # One waiting in the labelling queue, so its export renders an image.
                    {**sample(DEVICE, sample_id="fuzz-u1", true_label=4), "true_label": None},
                ]
            },
            headers=auth_headers(credential),
        )
        assert resp.status_code == 200, resp.text
        resp = http.post("/api/v1/rollouts", json={"model_line": "digits", "model_version": 2})
        assert resp.status_code == 201, resp.text
        ids["rollout_id"] = resp.json()["id"]
        ids["alert_id"] = _seed_alert(services)
        jobs = http.get("/api/v1/training-jobs").json()
        ids["job_id"] = jobs[0]["id"] if jobs else 1
        version = http.get("/api/v1/model-lines/digits/versions/1").json()
        ids["sha256"] = version.get("sha256") or "0" * 64
        ids["version"] = version.get("dataset_version") or "ds-1"
    ids.update(
        device_id=DEVICE,
        name="digits",
        line="digits",
        model_line="digits",
        sample_id="fuzz-s1",
        alias="champion",
        release=1,
    )
    yield {"url": srv.url, "admin": admin, "device": auth_headers(credential), "ids": ids}
    srv.stop()


def _seed_alert(services: Any) -> int:
    """A raised drift alert with a webhook delivery and a window, as the evaluator stores them."""
    t = datetime(2030, 1, 1, tzinfo=UTC)
    with services.sessions() as session:
        alert = Alert(
            rule="drift",
            model_line="digits",
            model_version=1,
            group_name="*",
            state="raised",
            first_window=t,
            last_window=t,
            raised_at=t,
            value=2.5,
            samples=200,
            figures={"samples": 200},
        )
        session.add(alert)
        session.flush()
        session.add(
            WebhookDelivery(alert_id=alert.id, event="alert.raised", payload={}, next_attempt_at=t)
        )
        session.add(
            MonitorWindow(
                model_line="digits",
                model_version=1,
                group_name="*",
                window_start=t,
                window_end=t,
                devices=1,
                summaries=1,
                samples=200,
                breaches=["drift"],
            )
        )
        session.commit()
        return alert.id


@pytest.fixture(scope="module")
def api_schema(live: dict[str, Any]) -> Any:
    return schemathesis.openapi.from_url(f"{live['url']}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4's lazy loader reads ``node._nodeid``, which pytest 9 no longer sets."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


_DEVICE_PATHS = (
    "/api/v1/devices/{device_id}/status",
    "/api/v1/devices/{device_id}/metrics",
    "/api/v1/devices/{device_id}/target",
    "/api/v1/devices/register",
    "/api/v1/samples",
    "/api/v1/devices/{device_id}/capture-policy/refusals",
)


def _seeded(case: Any, ids: dict[str, Any]) -> dict[str, Any] | None:
    """The case's path parameters with every known name replaced by a seeded id."""
    params = dict(case.path_parameters or {})
    if not params:
        return None
    out = {k: ids.get(k, v) for k, v in params.items()}
    if "version" in params and "model-lines" in case.path:
        out["version"] = 1  # a model version number, not a dataset id
    return out if out != params else None


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: Any, live: dict[str, Any]) -> None:
    headers = live["device"] if case.path in _DEVICE_PATHS else live["admin"]
    case.call_and_validate(base_url=live["url"], headers=headers, checks=[not_a_server_error])
    seeded = _seeded(case, live["ids"])
    if seeded is not None:
        case.path_parameters = seeded
        case.call_and_validate(base_url=live["url"], headers=headers, checks=[not_a_server_error])
