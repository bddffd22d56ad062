"""Issue 14's done-when: a drift alert, configured to do so, triggers a retraining whose model
version points to the alert, and a webhook receiver gets the alert.

Everything real: Mosquitto (started by the test), the MQTT bridge and ingest writer, the
evaluator and webhook sender threads, the training pipeline (``python -m training``) run by the
job runner, and an HTTP receiver (a ThreadingHTTPServer) that answers 500 to the first POST and
200 afterwards, so the delivery is retried with backoff. The server's clock is the test's: it
stamps each summary when the bridge receives it and decides when a window closes and when a
retry is due, so nothing waits on wall-clock time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from contract import Topics
from contract.monitoring import METADATA_KEY, MonitoringReference
from server.db.monitoring import Alert, MonitorSummaryRow, WebhookDelivery
from server.db.registry import ModelVersion, TrainingJob
from server.main import create_app
from server.retrain.scheduler import AlertRetrain, retrain_for_alert
from server.services import DIGITS_INPUT_SPEC, DIGITS_LABELS, Services, build_services
from tests.authkit import enroll
from tests.conftest import write_key_pair
from tests.monitoring.conftest import View
from tests.monitoring.monitoring_kit import (
    LINE,
    T0,
    FakeClock,
    WebhookReceiver,
    closed,
    inside,
    monitor_settings,
    summary,
)
from tests.server.conftest import (
    add_version,
    authed_client,
    create_line,
    make_settings,
    services_of,
    wait_for,
)
from tests.server.test_mqtt_bridge import bridge_settings
from training.data import digits_pools, drift
from training.export import onnx_predict_proba, read_metadata

SECRET = "webhook-secret-for-tests"
BACKOFF_S = 30.0
HALLS = {"hall-1": ("cam-1", "cam-2"), "hall-2": ("cam-3", "cam-4")}


def views_of(onnx: bytes) -> tuple[View, View]:
    """The field pool clean and drifted (the simulator's drift), run through ``onnx``."""
    field = digits_pools().field
    X = drift(field.X, severity=1.0, seed=1)
    return (
        View(0.0, field.X, field.y, onnx_predict_proba(onnx, field.X)),
        View(1.0, X, field.y, onnx_predict_proba(onnx, X)),
    )


def counted(services: Services, what: str, n: int) -> Callable[[], bool]:
    """Whether the ingest writer's or the evaluator's counter ``what`` reached ``n``."""
    source: Any = services.monitor if what == "windows_evaluated" else services.ingest.stats
    return lambda: bool(getattr(source, what) == n)


def test_a_drift_alert_trains_a_version_that_points_to_it_and_the_webhook_gets_it(
    broker: Any, tmp_path: Path, db_url: str, signing_key: Any
) -> None:
    clock = FakeClock()
    with WebhookReceiver(script=[500, 200]) as receiver:
        settings = bridge_settings(
            tmp_path,
            db_url,
            signing_key,
            broker,
            enable_ingest_writer=True,
            enable_monitor_evaluator=True,
            enable_webhook_sender=True,
            monitor_tick_s=0.1,
            webhook_tick_s=0.1,
            alert_webhook_url=receiver.url,
            alert_webhook_secret=SECRET,
            webhook_backoff_s=BACKOFF_S,
            alert_rules=["drift"],
            **monitor_settings(),
        )
        app = create_app(settings, services=build_services(settings, clock=clock))
        with authed_client(app) as client:
            services = services_of(client)
            # The line retrains on drift alerts; its first model comes from the real pipeline.
            create_line(
                client,
                initial_training=True,
                trainer=None,
                config={"trainer": "sklearn-mlp", "retrain_on_alerts": ["drift"]},
            )
            assert services.jobs.run_once() == 1
            with services.sessions() as session:
                v1 = session.scalars(select(ModelVersion)).one()
            assert v1.status == "champion" and v1.alert_id is None and v1.sha256
            onnx = services.store.read_bytes(v1.sha256)
            reference = MonitoringReference.from_json(read_metadata(onnx)[METADATA_KEY])
            clean, drifted = views_of(onnx)
            for hall, devices in HALLS.items():
                for d in devices:
                    enroll(client, d, LINE, groups=[hall])
            assert services.bridge is not None
            wait_for(services.bridge.connected.is_set, what="bridge connected")

            # Two windows of traffic over MQTT: hall-1 drifted, hall-2 clean.
            rng = np.random.default_rng(3)
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            topics = Topics()
            try:
                for k in range(2):
                    clock.set(inside(k))
                    infos = [
                        pub.publish(
                            topics.monitor(d),
                            summary(
                                reference, drifted if hall == "hall-1" else clean, d, 60, rng
                            ).to_json(),
                            qos=1,
                        )
                        for hall, devices in HALLS.items()
                        for d in devices
                    ]
                    for info in infos:
                        info.wait_for_publish(10)
                    wait_for(
                        counted(services, "monitor_written", 4 * (k + 1)),
                        what=f"window {k}'s summaries stored",
                    )
                    clock.set(closed(k))  # the evaluator thread closes the window
                    wait_for(
                        counted(services, "windows_evaluated", k + 1),
                        what=f"window {k} evaluated",
                    )
            finally:
                pub.loop_stop()
                pub.disconnect()
            with services.sessions() as session:
                assert session.scalar(select(func.count()).select_from(MonitorSummaryRow)) == 8

            # Raised after the second window: the group's and the version's fleet's. The first
            # one raised queued the training; the other found it queued.
            alerts = client.get("/api/v1/alerts", params={"state": "raised"}).json()
            assert {(a["rule"], a["group"]) for a in alerts} == {
                ("drift", "*"),
                ("drift", "hall-1"),
            }
            (trigger,) = [a for a in alerts if a["retrain_job_id"] is not None]
            (other,) = [a for a in alerts if a["retrain_job_id"] is None]
            assert "already queued" in other["retrain_note"]
            job = client.get(f"/api/v1/training-jobs/{trigger['retrain_job_id']}").json()
            assert (job["trigger"], job["alert_id"], job["status"]) == (
                "alert",
                trigger["id"],
                "queued",
            )

            # The webhook: the first POST is answered 500 and recorded; the retry is due
            # BACKOFF_S later on the server's clock, and is answered 200.
            def delivery_of(alert_id: int) -> WebhookDelivery:
                with services.sessions() as session:
                    return session.scalars(
                        select(WebhookDelivery).where(WebhookDelivery.alert_id == alert_id)
                    ).one()

            wait_for(lambda: receiver.count() == 2, what="both alerts POSTed once")
            first = receiver.received[0]
            failed_id = int(first.headers["X-Edgeloop-Delivery"])
            with services.sessions() as session:
                failed = session.get(WebhookDelivery, failed_id)
                assert failed is not None
            wait_for(lambda: delivery_of(failed.alert_id).attempts == 1, what="attempt recorded")
            pending = delivery_of(failed.alert_id)
            assert (pending.status, pending.last_status) == ("pending", 500)
            assert str(pending.last_error).startswith("HTTP 500")
            assert "receiver down" in str(pending.last_error)
            assert pending.next_attempt_at == closed(1) + timedelta(seconds=BACKOFF_S)
            assert receiver.count() == 2  # not retried before its time
            clock.set(pending.next_attempt_at)
            services.webhook.wake()
            wait_for(lambda: delivery_of(failed.alert_id).status == "delivered", what="the retry")
            done = delivery_of(failed.alert_id)
            assert (done.attempts, done.last_status) == (2, 200)
            assert str(done.last_error).startswith("HTTP 500")  # what the retry was for
            assert receiver.count() == 3
            retry = receiver.received[2]
            assert retry.headers["X-Edgeloop-Delivery"] == str(failed_id)
            assert retry.body == first.body
            got = {r.json["alert"]["id"]: r for r in receiver.received}
            assert set(got) == {a["id"] for a in alerts}
            body = got[trigger["id"]].json
            assert body["event"] == "alert.raised"
            assert (body["alert"]["rule"], body["alert"]["model_version"]) == ("drift", 1)
            assert body["alert"]["retrain_job_id"] == trigger["retrain_job_id"]
            assert "input_std" in body["alert"]["figures"]["drift"]["drifted"]
            assert body["alert"]["url"].endswith(f"/api/v1/alerts/{trigger['id']}")
            for r in receiver.received:
                mac = hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
                assert r.headers["X-Edgeloop-Signature"] == f"sha256={mac}"
                assert r.headers["X-Edgeloop-Event"] == "alert.raised"

            # The training the alert queued runs (the real pipeline) and its version records
            # the alert: lineage from a model version back to the drift that caused it.
            assert services.jobs.run_once() == trigger["retrain_job_id"]
            job = client.get(f"/api/v1/training-jobs/{trigger['retrain_job_id']}").json()
            assert job["status"] in ("succeeded", "rejected") and job["result_version"] == 2
            version = client.get(f"/api/v1/model-lines/{LINE}/versions/2").json()
            assert version["alert_id"] == trigger["id"] and version["job_id"] == job["id"]
            detail = client.get(f"/api/v1/alerts/{trigger['id']}").json()
            assert detail["retrain_job_id"] == job["id"]
            assert [(d["status"], d["attempts"]) for d in detail["deliveries"]] == [
                ("delivered", 1 if trigger["id"] != failed.alert_id else 2)
            ]
            with services.sessions() as session:
                assert session.scalar(select(func.count()).select_from(Alert)) == 2
                jobs = session.scalars(select(TrainingJob).order_by(TrainingJob.id)).all()
                assert [(j.trigger, j.alert_id) for j in jobs] == [
                    ("initial", None),
                    ("alert", trigger["id"]),
                ]


def settings_of(tmp_path: Path, db_url: str, signing_key: Any) -> Any:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    return make_settings(tmp_path, db_url, signing_key_path=priv)


def test_alert_training_keeps_the_retraining_discipline(
    tmp_path: Path, db_url: str, signing_key: Any
) -> None:
    """Only the rules the line's config names train; a cooldown delays the job; one job at a
    time; an alert on a version a rollout is replacing trains nothing. The config's rule names
    are checked when a line is created or reconfigured."""
    with authed_client(create_app(settings_of(tmp_path, db_url, signing_key))) as client:
        services = services_of(client)
        refused = client.post(
            "/api/v1/model-lines",
            json={
                "name": "other",
                "input_spec": DIGITS_INPUT_SPEC,
                "labels": DIGITS_LABELS,
                "initial_training": False,
                "config": {"trainer": "sklearn-mlp", "retrain_on_alerts": ["drift", "vibes"]},
            },
        )
        assert refused.status_code == 422 and "unknown alert rule(s) ['vibes']" in refused.text
        create_line(
            client,
            trainer=None,
            config={"trainer": "sklearn-mlp", "retrain_on_alerts": ["drift"], "cooldown_s": 600},
        )
        line = client.get(f"/api/v1/model-lines/{LINE}").json()
        assert line["training_config"]["retrain_on_alerts"] == ["drift"]
        bad = client.put(
            f"/api/v1/model-lines/{LINE}/config",
            json={"config": {"trainer": "sklearn-mlp", "retrain_on_alerts": "drift"}},
        )
        assert bad.status_code == 422 and "retrain_on_alerts must be a list" in bad.text
        add_version(services, version=1, status="champion", champion_release=True)
        finished = T0 - timedelta(seconds=100)
        with services.sessions() as session:
            session.add(
                TrainingJob(
                    model_line=LINE,
                    status="succeeded",
                    trigger="initial",
                    created_at=finished,
                    finished_at=finished,
                )
            )
            session.commit()

        def alert(rule: str, version: int, alert_id: int) -> AlertRetrain:
            with services.sessions() as session:
                out = retrain_for_alert(
                    session,
                    line=LINE,
                    rule=rule,
                    alert_id=alert_id,
                    model_version=version,
                    now=T0,
                )
                session.commit()
                return out

        assert alert("latency", 1, 10) == AlertRetrain(None, None)  # not a training rule
        queued = alert("drift", 1, 11)
        assert queued.job_id is not None and queued.note is None
        with services.sessions() as session:
            job = session.get(TrainingJob, queued.job_id)
            assert job is not None
            assert (job.trigger, job.alert_id, job.status) == ("alert", 11, "queued")
            assert job.not_before == finished + timedelta(seconds=600)  # the cooldown
        again = alert("drift", 1, 12)
        assert again.job_id is None and "already queued" in (again.note or "")

        # The job ends; v2 is in rollout: an alert on v1 is about a model being replaced.
        with services.sessions() as session:
            job = session.get(TrainingJob, queued.job_id)
            assert job is not None
            job.status, job.finished_at = "succeeded", T0
            session.commit()
        add_version(services, version=2, status="candidate")
        services.rollouts.create(
            model_line=LINE, model_version=2, canary_percent=None, created_by="test"
        )
        replaced = alert("drift", 1, 13)
        assert replaced.job_id is None and "being replaced by v2" in (replaced.note or "")
        on_candidate = alert("drift", 2, 14)
        assert on_candidate.job_id is not None
