"""Prometheus metrics and per-version time series, read from the database at request time.

The server keeps no metric state of its own beyond the ingest and MQTT counters: gauges are
computed by SQL aggregates when Prometheus scrapes, so several stateless server processes sharing
one PostgreSQL report the same fleet (process-local counters carry an ``instance`` label).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db import monitoring
from server.db.fleet import Device, DeviceMetric
from server.db.registry import TrainingJob
from server.db.rollouts import Rollout
from server.db.sample_store import Sample
from server.monitoring.estimate import estimate_trusted
from server.services import Services

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"


class FleetCollector(Collector):
    """Collects edgeloop's gauges and counters for one app's services."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        with self.services.sessions() as session:
            yield from _fleet(session)
            yield from _monitoring(session, self.services)
        yield from _process(self.services)


def _fleet(session: Session) -> Iterator[Metric]:
    devices = GaugeMetricFamily(
        "edgeloop_devices",
        "Registered devices by model line, state and model version",
        labels=["model_line", "state", "model_version"],
    )
    rows = session.execute(
        select(Device.model_line, Device.state, Device.model_version, func.count()).group_by(
            Device.model_line, Device.state, Device.model_version
        )
    )
    for line, state, version, n in rows:
        devices.add_metric([line, state or "unknown", str(version or "none")], n)
    yield devices

    rollouts = GaugeMetricFamily(
        "edgeloop_rollouts", "Rollouts by model line and state", labels=["model_line", "state"]
    )
    for line, state, n in session.execute(
        select(Rollout.model_line, Rollout.state, func.count()).group_by(
            Rollout.model_line, Rollout.state
        )
    ):
        rollouts.add_metric([line, state], n)
    yield rollouts

    samples = CounterMetricFamily(
        "edgeloop_samples_ingested", "Accepted samples stored, by model line", labels=["model_line"]
    )
    for line, n in session.execute(
        select(Sample.model_line, func.count()).group_by(Sample.model_line)
    ):
        samples.add_metric([line], n)
    yield samples

    jobs = GaugeMetricFamily(
        "edgeloop_training_jobs",
        "Training jobs by model line and status",
        labels=["model_line", "status"],
    )
    for line, status, n in session.execute(
        select(TrainingJob.model_line, TrainingJob.status, func.count()).group_by(
            TrainingJob.model_line, TrainingJob.status
        )
    ):
        jobs.add_metric([line, status], n)
    yield jobs


# How many windows back a (line, version, group)'s latest figures stay exported: a version
# that stopped reporting drops out of the gauges instead of showing stale figures forever.
EXPORTED_WINDOWS = 3


def _monitoring(session: Session, services: Services) -> Iterator[Metric]:
    """Active alerts, the latest window's figures per (line, version, group), deliveries."""
    key = ["model_line", "model_version", "group"]
    active = GaugeMetricFamily(
        "edgeloop_alerts_active",
        "1 for each raised alert, by model line, version, device group and rule",
        labels=[*key, "rule"],
    )
    for a in monitoring.active_alerts(session):
        active.add_metric([a.model_line, str(a.model_version), a.group_name, a.rule], 1.0)
    yield active
    acknowledged = GaugeMetricFamily(
        "edgeloop_alerts_acknowledged",
        "1 for each raised alert an operator acknowledged (e.g. to inhibit re-paging)",
        labels=[*key, "rule"],
    )
    for a in monitoring.acknowledged_active_alerts(session):
        acknowledged.add_metric([a.model_line, str(a.model_version), a.group_name, a.rule], 1.0)
    yield acknowledged
    gauges = {
        "drift_ratio": GaugeMetricFamily(
            "edgeloop_monitor_drift_ratio",
            "Latest window: highest PSI over its calibrated threshold (> 1: drift)",
            labels=key,
        ),
        "estimated_accuracy": GaugeMetricFamily(
            "edgeloop_monitor_estimated_accuracy",
            "Latest window: label-free accuracy estimate from confidence (CBPE)",
            labels=key,
        ),
        "live_accuracy": GaugeMetricFamily(
            "edgeloop_monitor_live_accuracy",
            "Latest window: accuracy on labelled traffic",
            labels=key,
        ),
        "samples": GaugeMetricFamily(
            "edgeloop_monitor_window_samples",
            "Latest window: inferences covered by the monitor summaries",
            labels=key,
        ),
    }
    trusted = GaugeMetricFamily(
        "edgeloop_monitor_estimate_trusted",
        "Latest window: 1 if the estimate can be read as accuracy, 0 if its drift verdict "
        "breaches (the estimate may be far off)",
        labels=key,
    )
    window_s = services.settings.monitor_window_s
    since = services.clock() - timedelta(seconds=window_s * EXPORTED_WINDOWS)
    for w in monitoring.latest_windows(session, since=since):
        labels = [w.model_line, str(w.model_version), w.group_name]
        for name, gauge in gauges.items():
            value = getattr(w, name)
            if value is not None:
                gauge.add_metric(labels, float(value))
        ok = estimate_trusted(w.estimated_accuracy, w.drift)
        if ok is not None:
            trusted.add_metric(labels, float(ok))
    yield from gauges.values()
    yield trusted
    deliveries = GaugeMetricFamily(
        "edgeloop_alert_webhook_deliveries",
        "Alert webhook deliveries by status (pending, delivered, failed)",
        labels=["status"],
    )
    for status, n in sorted(monitoring.delivery_counts(session).items()):
        deliveries.add_metric([status], n)
    yield deliveries


def _process(services: Services) -> Iterator[Metric]:
    stats = asdict(services.ingest.stats)
    for name in (
        "received",
        "status_written",
        "metrics_written",
        "monitor_written",
        "invalid",
        "refused_stored",
        "fields_dropped",
        "unknown_device",
        "batches",
        "failed_writes",
        "conflict_retries",
    ):
        c = CounterMetricFamily(
            f"edgeloop_ingest_{name}",
            f"Device reports: {name.replace('_', ' ')}",
            labels=["instance"],
        )
        c.add_metric([INSTANCE], stats[name])
        yield c
    queued = GaugeMetricFamily(
        "edgeloop_ingest_queue_depth", "Reports waiting for the ingest writer", labels=["instance"]
    )
    queued.add_metric([INSTANCE], services.ingest_queue.qsize())
    yield queued
    for name, value, what in (
        ("monitor_windows_evaluated", services.monitor.windows_evaluated, "windows evaluated"),
        ("monitor_windows_failed", services.monitor.windows_failed, "windows that failed"),
        ("alert_webhook_failed_posts", services.webhook.failures, "webhook POSTs that failed"),
    ):
        c = CounterMetricFamily(f"edgeloop_{name}", f"Monitoring: {what}", labels=["instance"])
        c.add_metric([INSTANCE], value)
        yield c
    up = GaugeMetricFamily(
        "edgeloop_mqtt_connected",
        "1 when this server is connected to the broker",
        labels=["instance"],
    )
    bridge = services.bridge
    up.add_metric([INSTANCE], 1.0 if bridge is not None and bridge.connected.is_set() else 0.0)
    yield up


def make_registry(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(services))
    return registry


def version_series(
    session: Session, *, line: str, bucket_s: int, since_ts: float
) -> list[dict[str, Any]]:
    """Accuracy, traffic and latency per model version per time bucket (device clock)."""
    bucket = func.floor(DeviceMetric.ts / bucket_s) * bucket_s
    rows = session.execute(
        select(
            DeviceMetric.model_version,
            bucket.label("t"),
            func.sum(DeviceMetric.inferences),
            func.sum(DeviceMetric.errors),
            func.sum(DeviceMetric.labelled),
            func.sum(DeviceMetric.correct),
            func.max(DeviceMetric.p95),
            func.count(func.distinct(DeviceMetric.device_id)),
        )
        .where(DeviceMetric.model_line == line, DeviceMetric.ts >= since_ts)
        .group_by(DeviceMetric.model_version, bucket)
        .order_by(bucket, DeviceMetric.model_version)
    )
    out = []
    for version, t, inferences, errors, labelled, correct, p95, devices in rows:
        out.append(
            {
                "model_version": version,
                "t": float(t),
                "devices": int(devices),
                "inferences": int(inferences or 0),
                "errors": int(errors or 0),
                "labelled": int(labelled or 0),
                "accuracy": (int(correct) / int(labelled)) if labelled else None,
                "latency_ms_p95_max": float(p95) if p95 is not None else None,
            }
        )
    return out
