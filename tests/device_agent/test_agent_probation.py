"""Metric-gated commit: a validly signed model that is worse on live traffic is rolled back
within its probation window and refused from then on; one that holds is committed.

Real Mosquitto, real HTTP artifact server, real ONNX Runtime, live labelled traffic."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from contract.messages import DeviceState
from device_agent import Agent, NoModelError
from device_agent.probation import Action, LiveSummary, ProbationPolicy, judge
from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    make_big_model,
    make_config,
    make_manifest,
    make_model,
    make_target,
    truth_label,
    wait_until,
)
from tests.device_agent.test_agent_e2e import Observer

TRUTH = 1


class Traffic:
    """Live labelled traffic: predict, then feed back the ground truth (model seed 1's answer)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.by_version: dict[int, int] = {}
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        while not self.stop.wait(0.004):
            x = rng.uniform(0, 16, FEATURES).astype(np.float32)
            try:
                p = self.agent.predict(x)
            except NoModelError:
                continue  # before the first install
            except Exception as exc:
                self.errors.append(repr(exc))
                continue
            self.by_version[p.model_version] = self.by_version.get(p.model_version, 0) + 1
            self.agent.feedback(p.prediction_id, truth_label(TRUTH, x))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def observer(broker):
    obs = Observer(broker.host, broker.port)
    yield obs
    obs.close()


def test_worse_model_rolled_back_and_refused_thereafter(
    broker, observer: Observer, fake_server: FakeServer, tmp_path, signing_key
) -> None:
    def target(data: bytes, release: int, version: int):
        return make_target(
            make_manifest(data, release=release, model_version=version),
            signing_key,
            fake_server.add(f"r{release}.onnx", data),
            rollout_id=100 + release,
        )

    good1 = make_model(TRUTH)
    bad = make_model(5)  # validly signed, loads, passes warm-up: just worse on live data
    good2 = make_big_model(TRUTH, tag="v3", hidden=128)  # same answers as good1, other bytes
    cfg = make_config(
        tmp_path / "state",
        signing_key,
        server_url=fake_server.url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        probation_min_labelled=30,
        probation_max_s=60.0,
    )
    agent = Agent(cfg)
    agent.start()
    traffic = Traffic(agent)
    try:
        observer.publish_target("dev-1", target(good1, 1, 1).to_json())
        observer.wait_status(lambda s: s.state == DeviceState.COMMITTED and s.model_version == 1)
        wait_until(lambda: traffic.by_version.get(1, 0) >= 60)  # the baseline's live record

        observer.publish_target("dev-1", target(bad, 2, 2).to_json())
        observer.wait_status(lambda s: s.state == DeviceState.PROBATION and s.target_release == 2)
        rolled = observer.wait_status(lambda s: s.state == DeviceState.ROLLED_BACK)
        assert rolled.target_release == 2 and rolled.rollout_id == 102
        assert rolled.model_version == 1  # already serving the previous slot when reported
        assert rolled.reason is not None and rolled.reason.startswith("accuracy")
        served_bad = traffic.by_version.get(2, 0)
        assert 0 < served_bad < 200  # caught within the window, long before its time bound
        status = agent.status()
        assert status["model_version"] == 1 and status["state"] == "rolled_back"
        assert status["refused"][0]["release"] == 2
        assert status["release"] == 1 and status["highest_release"] == 1

        # Offered again (retained target on reconnect, or a replay): refused without download.
        downloads = len(fake_server.requests_for("r2.onnx"))
        observer.publish_target("dev-1", target(bad, 2, 2).to_json())
        refused = observer.wait_status(lambda s: s.state == DeviceState.REFUSED)
        assert refused.reason is not None and refused.reason.startswith("VersionRefusedError")
        assert len(fake_server.requests_for("r2.onnx")) == downloads
        assert traffic.by_version.get(2, 0) == served_bad

        # A model that holds on live traffic commits after the labelled-inference bound.
        observer.publish_target("dev-1", target(good2, 3, 3).to_json())
        committed = observer.wait_status(
            lambda s: s.state == DeviceState.COMMITTED and s.target_release == 3
        )
        assert committed.reason is not None and "labelled" in committed.reason
        assert agent.predict(np.zeros(FEATURES, dtype=np.float32)).model_version == 3
        assert not traffic.errors
    finally:
        traffic.close()
        agent.stop()

    # The refusal is persisted: a restarted agent refuses release 2 too.
    again = Agent(make_config(tmp_path / "state", signing_key, server_url=fake_server.url))
    try:
        assert again.resume()
        assert again.status()["refused"][0]["release"] == 2
        assert again._updater.handle_target(target(bad, 2, 2)) == DeviceState.REFUSED
        assert again.predict(np.zeros(FEATURES, dtype=np.float32)).model_version == 3
    finally:
        again.stop()


def test_probation_survives_restart_and_crash_loop_rolls_back(
    fake_server: FakeServer, tmp_path, signing_key
) -> None:
    """A job found on probation at start counts a boot; past the limit it rolls back before
    the suspect model is loaded again."""
    m1, m2 = make_model(TRUTH), make_model(6)
    cfg = make_config(
        tmp_path / "state", signing_key, probation_max_s=3600.0, probation_max_boots=2
    )
    first = Agent(cfg)
    up = first._updater
    for data, rel in ((m1, 1), (m2, 2)):
        t = make_target(
            make_manifest(data, release=rel, model_version=rel),
            signing_key,
            fake_server.add(f"m{rel}.onnx", data),
        )
        up.offer(t)
        while up.job is not None and up.job.state not in (
            DeviceState.COMMITTED,
            DeviceState.PROBATION,
        ):
            up.step()
        up.step()
    assert up.job is not None and up.job.state == DeviceState.PROBATION
    first.stop()  # no commit happened: "power cut" while on probation
    for boot in (1, 2):
        a = Agent(cfg)
        assert a.resume()
        job = a._updater.job
        assert job is not None and job.boots == boot
        assert a.status()["model_version"] == 2
        a.stop()
    last = Agent(cfg)
    assert last.resume()
    assert last.status()["model_version"] == 1  # rolled back before loading the trial
    job = last._updater.job
    assert job is not None and job.state == DeviceState.ROLLED_BACK
    assert "restarted 2 times" in (job.reason or "")
    last.stop()


def test_judge_rules() -> None:
    p = ProbationPolicy(min_labelled=30, max_s=60)
    base = LiveSummary(
        inferences=500, labelled=100, correct=95, latency_samples=500, p95_ms=1.0, p50_ms=0.4
    )
    ok = LiveSummary(inferences=40, labelled=30, correct=28, latency_samples=40, p95_ms=1.1)
    assert judge(ok, base, 5, p).action == Action.COMMIT
    few = LiveSummary(inferences=5, labelled=3, correct=3, latency_samples=5, p95_ms=1.0)
    assert judge(few, base, 5, p).action == Action.CONTINUE
    assert judge(few, base, 61, p).action == Action.COMMIT  # time bound, nothing degraded
    worse = LiveSummary(inferences=12, labelled=12, correct=2, latency_samples=12, p95_ms=1.0)
    assert judge(worse, base, 1, p).action == Action.ROLLBACK
    # A small, insignificant dip does not roll back a good model.
    dip = LiveSummary(inferences=30, labelled=30, correct=26, latency_samples=30, p95_ms=1.0)
    assert judge(dip, base, 5, p).action == Action.COMMIT
    slow = LiveSummary(
        inferences=100, labelled=5, correct=5, latency_samples=100, p95_ms=9.0, p50_ms=7.0
    )
    verdict = judge(slow, base, 5, p)
    assert verdict.action == Action.ROLLBACK
    assert verdict.reason == (
        "p95 latency 9.00 ms vs 1.00 ms for the previous model (bound 7.00 ms); "
        "p50 7.00 ms vs 0.40 ms"
    )
    # A busy host stretches the tail, not the median: the model is not slower, nothing rolls
    # back (a demo device on a loaded machine did: p95 7.41 ms against a 0.20 ms baseline).
    tail = LiveSummary(
        inferences=60, labelled=30, correct=29, latency_samples=60, p95_ms=7.41, p50_ms=0.3
    )
    verdict = judge(tail, base, 5, p)
    assert verdict.action == Action.COMMIT, verdict.reason
    # A summary without a median (written by an older agent) is judged on the tail alone.
    old = LiveSummary(inferences=100, labelled=5, correct=5, latency_samples=100, p95_ms=9.0)
    assert judge(old, base, 5, p).action == Action.ROLLBACK
    errs = LiveSummary(inferences=50, errors=10, latency_samples=40, p95_ms=1.0)
    assert judge(errs, base, 5, p).action == Action.ROLLBACK
    # No baseline labels (e.g. an unlabelled device): commit on the time bound.
    assert judge(few, None, 61, p).action == Action.COMMIT
