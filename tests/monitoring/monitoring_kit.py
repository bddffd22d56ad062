"""What the server-side monitoring tests share: a settable clock, a real model registered as a
version, device summaries built with the model's own reference, and a real HTTP webhook
receiver (a ThreadingHTTPServer on a free port) that answers from a script."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from contract import MetricsReport
from contract.monitoring import MonitoringReference, MonitorSummary
from server.db.registry import ModelVersion
from server.services import Services
from tests.monitoring.conftest import View
from tests.server.conftest import add_version

LINE = "digits"
WINDOW_S = 60.0  # seconds per monitoring window in these tests
CLOSE_DELAY_S = 5.0
T0 = datetime(2030, 1, 1, tzinfo=UTC)  # a window boundary (a multiple of WINDOW_S)


class FakeClock:
    """The server's clock, moved by the test (``services.clock`` and the bridge's stamps)."""

    def __init__(self, start: datetime = T0) -> None:
        self._lock = threading.Lock()
        self._now = start

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now


def window_start(k: int) -> datetime:
    return T0 + timedelta(seconds=k * WINDOW_S)


def inside(k: int, offset_s: float = 10.0) -> datetime:
    """A moment inside window ``k``."""
    return window_start(k) + timedelta(seconds=offset_s)


def closed(k: int) -> datetime:
    """The first moment window ``k`` is evaluated."""
    return window_start(k + 1) + timedelta(seconds=CLOSE_DELAY_S + 1)


def monitor_settings() -> dict[str, Any]:
    """Settings overrides of the monitoring tests (see make_settings)."""
    return {
        "monitor_window_s": WINDOW_S,
        "monitor_close_delay_s": CLOSE_DELAY_S,
        "drift_null_draws": 20_000,
    }


def register_model(
    services: Services, onnx: bytes, *, version: int, line: str = LINE, champion: bool = True
) -> ModelVersion:
    """Register ``onnx`` as a version (as the job runner would), the champion with its release."""
    return add_version(
        services,
        line=line,
        version=version,
        status="champion" if champion else "candidate",
        champion_release=champion,
        onnx=onnx,
        metrics={},
    )


def summary(
    reference: MonitoringReference,
    view: View,
    device_id: str,
    n: int,
    rng: np.random.Generator,
    *,
    version: int = 1,
    line: str = LINE,
    start: float = 1_900_000_000.0,
) -> MonitorSummary:
    """One device's period: ``n`` inferences drawn from ``view``, binned by the reference."""
    idx = rng.integers(0, len(view.X), n)
    hist = reference.histogram(view.X[idx], view.P[idx])
    return MonitorSummary(
        device_id=device_id,
        model_line=line,
        model_version=version,
        start=start,
        end=start + 30.0,
        samples=n,
        counts=tuple((s.name, tuple(int(v) for v in hist[s.name])) for s in reference.signals),
    )


def metrics(
    device_id: str,
    *,
    inferences: int,
    errors: int = 0,
    labelled: int = 0,
    correct: int = 0,
    p95_ms: float = 5.0,
    version: int = 1,
) -> MetricsReport:
    return MetricsReport(
        device_id=device_id,
        ts=1_900_000_000.0,
        model_line=LINE,
        model_version=version,
        window_s=30.0,
        inferences=inferences,
        errors=errors,
        labelled=labelled,
        correct=correct,
        latency_ms_p50=p95_ms / 2,
        latency_ms_p95=p95_ms,
    )


def ingest(services: Services, at: datetime, reports: Iterable[Any]) -> None:
    """Write reports received at ``at`` through the ingest writer (the bridge's next step)."""
    batch = []
    for r in reports:
        kind = "monitor" if isinstance(r, MonitorSummary) else "metrics"
        batch.append((kind, r.device_id, r.to_json(), at))
    services.ingest.write_batch(batch)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A real HTTP server that answers each POST with the next status of ``script`` (the last
    one repeats) and records what it got."""

    script: list[int]
    port: int = 0  # 0: any free port
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.received.append(Received(dict(self.headers.items()), body))
                    status = receiver.script[min(len(receiver.received), len(receiver.script)) - 1]
                payload = b'{"ok": false, "why": "receiver down"}' if status >= 300 else b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/edgeloop"

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
