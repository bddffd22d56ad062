"""Prometheus endpoint, per-version metric series and the dashboard's static files."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from contract import DeviceState, MetricsReport, StatusReport
from tests.server.conftest import create_line, register, services_of


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def report_metrics(client, device: str, version: int, ts: float, labelled: int, correct: int):
    services = services_of(client)
    services.ingest.submit(
        "status",
        StatusReport(device, ts, DeviceState.COMMITTED, "digits", version, version),
    )
    services.ingest.submit(
        "metrics",
        MetricsReport(device, ts, "digits", version, 5.0, labelled, 0, labelled, correct, 0.2, 0.5),
    )
    services.ingest.drain()


def test_prometheus_reports_devices_samples_and_ingest(client):
    create_line(client)
    for d in ("d1", "d2", "d3"):
        register(client, d)
    now = time.time()
    report_metrics(client, "d1", 1, now, 10, 9)
    report_metrics(client, "d2", 1, now, 10, 8)
    m = scrape(client)
    committed_v1 = (
        "edgeloop_devices",
        (("model_line", "digits"), ("model_version", "1"), ("state", "committed")),
    )
    assert m[committed_v1] == 2
    unknown = (
        "edgeloop_devices",
        (("model_line", "digits"), ("model_version", "none"), ("state", "unknown")),
    )
    assert m[unknown] == 1
    written = [v for (name, _), v in m.items() if name == "edgeloop_ingest_metrics_written_total"]
    assert written == [2]


def test_series_buckets_accuracy_per_version(client):
    create_line(client)
    register(client, "d1")
    register(client, "d2")
    t0 = (time.time() // 10) * 10 - 20
    report_metrics(client, "d1", 1, t0 + 1, 10, 5)
    report_metrics(client, "d2", 1, t0 + 2, 10, 7)
    report_metrics(client, "d1", 2, t0 + 11, 20, 19)
    r = client.get("/api/v1/model-lines/digits/series", params={"bucket_s": 10})
    assert r.status_code == 200, r.text
    rows = {(p["model_version"], p["t"]): p for p in r.json()}
    assert rows[(1, t0)]["accuracy"] == 12 / 20
    assert rows[(1, t0)]["devices"] == 2
    assert rows[(2, t0 + 10)]["accuracy"] == 19 / 20
    assert client.get("/api/v1/model-lines/nope/series").status_code == 404
    assert client.get("/api/v1/model-lines/digits/series?bucket_s=0").status_code == 422


def test_dashboard_is_served(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and "edgeloop" in page.text
    assert client.get("/ui/app.js").status_code == 200
