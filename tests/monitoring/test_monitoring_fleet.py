"""Issue 14's done-when: on a simulated fleet against a real Mosquitto, a drifted group is
detected, the untouched groups stay silent, and a long run without drift raises no alert.

Everything real: Mosquitto with the server's password file and ACL (``allow_anonymous false``:
each device logs in with the credential its enrollment returned, on its own MQTT v5 session),
the server app's MQTT bridge and ingest writer, its evaluator (``MonitorEvaluator.run_once``,
what the evaluator thread calls) and the database. The fleet is the benchmark's
(``benchmarks.monitoring.FleetSim``): the digits line's real first model loaded by the agent's
runtime, every input classified by ONNX Runtime and fed to the agent's ``Monitor``; each period's
summaries are published by each device's own agent MQTT link (``device_agent.mqtt.MqttLink``,
``publish_monitor``: QoS 1 on its own monitor topic), byte for byte what the simulator encoded.
The server's clock is the test's (``FakeClock``): it stamps each summary as the bridge receives
it and says when a window is closed, so nothing waits on wall-clock time.

The fleet (``GROUPS``): five groups of 2 to 4 devices, 14 in all, each device classifying 50
inputs per 60-second window: group windows of 100 to 200 samples (the drift rule's minimum is
100), the whole fleet's ("*") of 700. Clean traffic is resampled from the 497-image field pool,
so every window also carries the pool's own sampling error; the server is told so through its
operator setting ``drift_dispersion`` (repeated scenes), as the benchmark tells its judge, sized
for the largest window the server judges: the fleet's, ``1 + 700 / 497``. (The benchmark's
judge scores groups only and sizes it for the median group; on the fleet window that would
understate the repetition and raise false fleet-wide alerts.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from benchmarks.monitoring import FleetSim, Group, Scenario, drift_pools
from contract.monitoring import MonitorSummary
from contract.topics import Topics
from device_agent.config import AgentConfig
from device_agent.inbox import TargetInbox
from device_agent.mqtt import MqttLink
from firmware_sim.services import Mosquitto
from server.db.monitoring import ALL_DEVICES, Alert, MonitorWindow
from server.identity.broker_acl import ACL_FILE, PASSWORD_FILE
from server.main import create_app
from server.services import Services, build_services
from tests.authkit import enroll
from tests.conftest import poll, write_key_pair
from tests.monitoring.conftest import Trained
from tests.monitoring.monitoring_kit import (
    LINE,
    WINDOW_S,
    FakeClock,
    closed,
    inside,
    monitor_settings,
    register_model,
    window_start,
)
from tests.server.conftest import authed_client, create_line, make_settings, services_of

SERVER_USER, SERVER_PASSWORD = "edgeloop-server", "server-secret-for-tests"
PER_WINDOW = 50  # inferences per device per window
DRIFTED = "east"
GROUPS = (
    Group("north", 2),
    Group("south", 3),
    Group("west", 4),
    Group(DRIFTED, 3, severity=1.0),  # the simulator's camera drift, from drift_from on
    Group("harbour", 2),
)
UNTOUCHED = frozenset(g.name for g in GROUPS if not g.severity)
FLEET_WINDOW = sum(g.devices for g in GROUPS) * PER_WINDOW
ALPHA = 0.01  # the drift verdict's stated per-window false-alarm rate (drift_alpha)


def scenario(*, periods: int, drift_from: int, seed: int) -> Scenario:
    return Scenario(
        groups=GROUPS,
        periods=periods,
        drift_from=drift_from,
        period_s=WINDOW_S,
        rate_hz=PER_WINDOW / WINDOW_S,
        alpha=ALPHA,
        seed=seed,
    )


@pytest.fixture(scope="module")
def pools() -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """The field pool clean and with the simulator's drift (what the benchmark uses)."""
    return drift_pools({g.severity for g in GROUPS})


@dataclass
class Fleet:
    """The server on the test's clock, the broker, and one agent MQTT link per device."""

    client: Any  # the operator's HTTP client (TestClient)
    services: Services
    clock: FakeClock
    links: dict[str, MqttLink]
    model_path: Path
    topics: Topics = field(default_factory=Topics)
    sent: int = 0


@dataclass
class Run:
    """What the server recorded over a run: its windows and when each alert appeared."""

    windows: dict[tuple[str, int], MonitorWindow]  # (group, window index) -> row
    alerts: dict[int, tuple[int, Alert]]  # alert id -> (window whose evaluation raised it, row)

    def alerts_of(self, groups: set[str] | frozenset[str]) -> list[Alert]:
        return [a for _, a in self.alerts.values() if a.group_name in groups]

    def false_alarms(
        self, clean: Callable[[str, int], bool]
    ) -> tuple[int, int, list[tuple[str, int, list[str]]]]:
        """(clean group windows scored for drift, those whose drift verdict breached, every
        clean window that breached any rule) over the windows ``clean(group, k)`` admits."""
        scored = breached = 0
        any_rule = []
        for (group, k), w in sorted(self.windows.items()):
            if not clean(group, k):
                continue
            if w.drift_breach is not None:
                scored += 1
                breached += bool(w.drift_breach)
            if w.breaches:
                any_rule.append((group, k, list(w.breaches)))
        return scored, breached, any_rule


@pytest.fixture
def fleet(
    tmp_path: Path,
    db_url: str,
    signing_key: Any,
    trained: Trained,
    pools: dict[float, tuple[np.ndarray, np.ndarray]],
) -> Iterator[Fleet]:
    pool_size = len(pools[0.0][1])  # the field pool the clean traffic is resampled from
    # The broker runs before the server, as deployed: it starts with empty password and ACL
    # files (no one may log in); the server writes them at start and on each enrollment, and
    # makes the broker reload them (SIGHUP through its pid file).
    broker_dir = tmp_path / "broker-auth"
    broker_dir.mkdir()
    for name in (PASSWORD_FILE, ACL_FILE):
        (broker_dir / name).touch(mode=0o600)
    broker = Mosquitto(tmp_path / "mosquitto", auth_dir=broker_dir).start()
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        enable_mqtt=True,
        mqtt_port=broker.port,
        mqtt_username=SERVER_USER,
        mqtt_password=SERVER_PASSWORD,
        mqtt_reconnect_max_s=1,  # refused until the broker reloaded: retry every second
        broker_config_dir=broker_dir,
        broker_pid_file=broker.pid_file,
        enable_ingest_writer=True,
        ingest_batch_wait_s=0.05,
        drift_alpha=ALPHA,
        drift_dispersion=1.0 + FLEET_WINDOW / pool_size,
        **monitor_settings(),
    )
    clock = FakeClock()
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(trained.onnx)
    links: dict[str, MqttLink] = {}
    try:
        app = create_app(settings, services=build_services(settings, clock=clock))
        with authed_client(app) as client:
            services = services_of(client)
            create_line(client, config={"trainer": "sklearn-mlp"}, trainer=None)
            register_model(services, trained.onnx, version=1)
            for g in GROUPS:
                for i in range(g.devices):
                    device_id = f"{g.name}-{i:02d}"  # FleetSim's names
                    credential = enroll(client, device_id, LINE, groups=[g.name])["credential"]
                    cfg = AgentConfig(
                        device_id=device_id,
                        model_line=LINE,
                        mqtt_host=broker.host,
                        mqtt_port=broker.port,
                        mqtt_reconnect_max_s=1.0,
                        state_dir=tmp_path / "agents" / device_id,
                    )
                    links[device_id] = MqttLink(cfg, TargetInbox(), credential=credential)
            for link in links.values():
                link.start()
            assert services.bridge is not None
            poll("the bridge connected", services.bridge.connected.is_set, every=0.05)
            for device_id, link in links.items():
                poll(f"{device_id} logged in", link.connected.is_set, every=0.05)
            yield Fleet(client, services, clock, links, model_path)
    finally:
        for link in links.values():
            link.stop()
        broker.stop()


def run_windows(fleet: Fleet, sim: FleetSim, periods: range) -> Run:
    """Each window: the simulated devices serve and summarise their period, each publishes its
    summary over its own MQTT session while the server's clock is inside the window; once the
    ingest writer stored all of them the clock moves past the window's close and the evaluator
    closes it."""
    services, stats = fleet.services, fleet.services.ingest.stats
    raised_in: dict[int, int] = {}  # alert id -> the window whose evaluation raised it
    for k in periods:
        fleet.clock.set(inside(k))
        for topic, payload in sim.period(k):
            summary = MonitorSummary.from_dict(payload)
            assert topic == fleet.topics.monitor(summary.device_id)
            assert summary.to_json() == payload  # the link publishes the simulator's bytes
            fleet.links[summary.device_id].publish_monitor(summary)
            fleet.sent += 1
        poll(
            f"window {k}'s summaries stored",
            lambda: stats.monitor_written + stats.invalid + stats.unknown_device >= fleet.sent,
            every=0.02,
        )
        assert (stats.invalid, stats.unknown_device, stats.failed_writes) == (0, 0, 0)
        assert stats.monitor_written == fleet.sent
        fleet.clock.set(closed(k))
        assert services.monitor.run_once() == 1, f"window {k} evaluated once"
        with services.sessions() as session:
            for alert_id in session.scalars(select(Alert.id)):
                raised_in.setdefault(alert_id, k)
    with services.sessions() as session:
        rows = list(session.scalars(select(MonitorWindow)))
    index = {window_start(k): k for k in periods}
    windows = {(w.group_name, index[w.window_start]): w for w in rows}
    with services.sessions() as session:  # the alerts as they stand at the end of the run
        final = {a.id: a for a in session.scalars(select(Alert))}
    return Run(windows, {i: (k, final[i]) for i, k in raised_in.items()})


def check_windows(run: Run, periods: range) -> None:
    """Every group reported every window, with all its devices and inferences."""
    for k in periods:
        for g in GROUPS:
            w = run.windows[(g.name, k)]
            assert (w.devices, w.summaries, w.samples) == (
                g.devices,
                g.devices,
                g.devices * PER_WINDOW,
            )
            assert w.model_version == 1 and w.drift_breach is not None
        assert run.windows[(ALL_DEVICES, k)].samples == FLEET_WINDOW


def describe(run: Run) -> str:
    return "; ".join(
        f"{a.rule}/{a.group_name} raised at window {k} (first breach {a.first_window:%H:%M})"
        for k, a in sorted(run.alerts.values(), key=lambda x: (x[0], x[1].id))
    )


def test_the_drifted_group_is_detected_and_the_untouched_ones_stay_silent(
    fleet: Fleet, trained: Trained, pools: dict[float, tuple[np.ndarray, np.ndarray]]
) -> None:
    """East gets the simulator's camera drift from window 6 on: a drift alert on east within 3
    windows of it. Nothing is raised before the drift, and no rule raises anything on the four
    untouched groups over the whole run."""
    sc = scenario(periods=12, drift_from=6, seed=1)
    sim = FleetSim(sc, fleet.model_path, pools)
    periods = range(sc.periods)
    run = run_windows(fleet, sim, periods)
    check_windows(run, periods)

    scored, breached, any_rule = run.false_alarms(lambda g, k: g in UNTOUCHED or k < sc.drift_from)
    figures = (
        f"{breached} of {scored} clean group windows breached the drift verdict; "
        f"clean windows breaching any rule: {any_rule}; alerts: {describe(run)}"
    )
    print(f"\nfleet detection run: {figures}")

    # Detection: the drift rule on east, raised by the evaluation of a drifted window at most
    # 3 windows into the drift (the benchmark's "detection periods"), from drifted windows only.
    raised = sorted(
        ((k, a) for k, a in run.alerts.values() if (a.rule, a.group_name) == ("drift", DRIFTED)),
        key=lambda item: item[0],
    )
    assert raised, f"no drift alert on {DRIFTED}: {figures}"
    k, alert = raised[0]
    assert sc.drift_from <= k and k - sc.drift_from + 1 <= 3, figures
    assert alert.first_window >= window_start(sc.drift_from), figures
    assert (alert.state, alert.model_line, alert.model_version) == ("raised", LINE, 1)
    assert alert.samples == run.windows[(DRIFTED, k)].samples and (alert.value or 0) > 1.0
    assert alert.figures["drift"]["drifted"], alert.figures
    for j in (k - 1, k):  # the two breaching windows it rests on (raise after 2)
        assert run.windows[(DRIFTED, j)].drift_breach is True, (j, figures)

    # Silence: no alert of any rule on an untouched group, and none at all before the drift.
    assert run.alerts_of(UNTOUCHED) == [], figures
    assert not [a for k, a in run.alerts.values() if k < sc.drift_from], figures
    # Only the drifted group and the fleet it is part of raised anything.
    assert {a.group_name for _, a in run.alerts.values()} <= {DRIFTED, ALL_DEVICES}, figures
    # What the operator reads back from the server's API is the same.
    listed = fleet.client.get("/api/v1/alerts", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    assert sorted((a["rule"], a["group"], a["state"]) for a in listed.json()) == sorted(
        (a.rule, a.group_name, a.state) for _, a in run.alerts.values()
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_long_run_without_drift_raises_no_alert(
    fleet: Fleet, trained: Trained, pools: dict[float, tuple[np.ndarray, np.ndarray]]
) -> None:
    """100 windows, no group drifted: no alert of any rule on any group (nor the fleet's).
    Single windows may breach the drift verdict (alpha per window, by design); the hysteresis
    (raise after 2 breaching windows in a row) keeps them from raising an alert."""
    windows = 100
    sc = scenario(periods=windows, drift_from=windows, seed=2)  # the drift never starts
    sim = FleetSim(sc, fleet.model_path, pools)
    periods = range(sc.periods)
    run = run_windows(fleet, sim, periods)
    check_windows(run, periods)

    scored, breached, any_rule = run.false_alarms(lambda g, k: True)
    figures = (
        f"{windows} windows x {len(GROUPS)} groups + the fleet: {breached} of {scored} group "
        f"windows breached the drift verdict ({breached / scored:.2%}, alpha {ALPHA:g}); "
        f"windows breaching any rule: {any_rule}; alerts: {describe(run) or 'none'}"
    )
    print(f"\nfleet no-drift run: {figures}")
    assert scored == windows * (len(GROUPS) + 1), figures
    assert run.alerts == {}, figures
    assert fleet.client.get("/api/v1/alerts").json() == []
