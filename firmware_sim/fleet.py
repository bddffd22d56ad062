"""A fleet of simulated devices, each one a real ``device_agent.Agent``.

The world model is simple and honest: every device sees digits from the ``field`` pool, clean or
drifted (torchvision rotation, blur and contrast loss, see ``training.data.drift``), and learns the
true label of each input right after predicting it, as a quality-control station would. Accuracy is
measured here, from the predictions the agents really returned.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent import Agent, AgentConfig, NoModelError
from training.data import digits_pools, drift

log = logging.getLogger("edgeloop.sim")


@dataclass
class Inputs:
    """The field pool, clean and drifted (computed once, shared by every device)."""

    clean: np.ndarray
    drifted: np.ndarray
    labels: np.ndarray

    @classmethod
    def build(cls, *, severity: float = 1.0, seed: int = 1) -> Inputs:
        pool = digits_pools().field
        return cls(pool.X, drift(pool.X, severity=severity, seed=seed), pool.y)


@dataclass
class Tally:
    """Predictions and hits per model version, over a measurement window."""

    predictions: int = 0
    correct: int = 0
    failed: int = 0
    by_version: dict[int, list[int]] = field(default_factory=dict)  # version -> [n, correct]

    @property
    def accuracy(self) -> float:
        return self.correct / self.predictions if self.predictions else float("nan")

    def add(self, version: int, ok: bool) -> None:
        self.predictions += 1
        self.correct += ok
        n_ok = self.by_version.setdefault(version, [0, 0])
        n_ok[0] += 1
        n_ok[1] += ok


SENSOR_NOISE = 0.02  # std of per-pixel Gaussian sensor noise, in units of the [0, 1] range


class SimDevice:
    """One device: a real agent plus the camera that feeds it.

    Every frame gets its own sensor noise, as a real camera's would: two devices looking at the
    same digit never send byte-identical inputs (the server rejects exact duplicates).
    """

    def __init__(
        self, agent: Agent, seed: int, noise: float = SENSOR_NOISE, label_fraction: float = 1.0
    ) -> None:
        self.agent = agent
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.label_fraction = label_fraction  # share of inferences whose true label is learnt
        self.served: dict[int, int] = {}  # model version -> answers this device served

    @property
    def device_id(self) -> str:
        return self.agent.config.device_id

    def step(self, inputs: Inputs, drifted: bool, tally: Tally) -> None:
        i = int(self.rng.integers(len(inputs.labels)))
        x = inputs.drifted[i] if drifted else inputs.clean[i]
        if self.noise > 0:
            x = np.clip(x + self.rng.normal(0.0, self.noise, x.shape), 0.0, 1.0).astype(np.float32)
        truth = int(inputs.labels[i])
        try:
            pred = self.agent.predict(x)
        except NoModelError:
            tally.failed += 1
            return
        tally.add(pred.model_version, pred.label == truth)
        self.served[pred.model_version] = self.served.get(pred.model_version, 0) + 1
        if self.label_fraction >= 1.0 or self.rng.random() < self.label_fraction:
            self.agent.feedback(pred.prediction_id, truth)


@dataclass
class FleetConfig:
    server_url: str
    mqtt_host: str
    mqtt_port: int
    trusted_keys: Sequence[bytes]
    state_root: Path
    model_line: str = "digits"
    devices: int = 24
    id_prefix: str = "sim"
    metrics_interval_s: float = 2.0
    upload_interval_s: float = 0.5
    confidence_floor: float = 0.6
    trusted_root: bytes | None = None  # pinned root v1 envelope; wins over trusted_keys
    bootstrap_token: str = ""  # multi-use enrollment token the devices enroll with
    label_fraction: float = 1.0  # share of inferences a device learns the true label of


class Fleet:
    """Starts, drives and stops a set of simulated devices."""

    def __init__(self, config: FleetConfig, inputs: Inputs | None = None) -> None:
        self.config = config
        self.inputs = inputs if inputs is not None else Inputs.build()
        self.devices: list[SimDevice] = []
        self.drifted = False
        self._stop = threading.Event()
        self._driver: threading.Thread | None = None
        self._tally = Tally()
        self._tally_lock = threading.Lock()

    def agent_config(self, index: int) -> AgentConfig:
        c = self.config
        device_id = f"{c.id_prefix}-{index:04d}"
        return AgentConfig(
            device_id=device_id,
            model_line=c.model_line,
            server_url=c.server_url,
            mqtt_host=c.mqtt_host,
            mqtt_port=c.mqtt_port,
            state_dir=c.state_root / device_id,
            trusted_keys=list(c.trusted_keys),
            trusted_root=c.trusted_root,
            metrics_interval_s=c.metrics_interval_s,
            upload_interval_s=c.upload_interval_s,
            confidence_floor=c.confidence_floor,
            bootstrap_token=c.bootstrap_token,
        )

    def start(self) -> None:
        for i in range(self.config.devices):
            agent = Agent(self.agent_config(i))
            agent.start()
            self.devices.append(SimDevice(agent, seed=i, label_fraction=self.config.label_fraction))

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(d.agent.wait_ready(max(0.0, deadline - time.monotonic())) for d in self.devices)

    def versions(self) -> dict[str, int | None]:
        return {d.device_id: d.agent.status().get("model_version") for d in self.devices}

    # Traffic ---------------------------------------------------------------------------------

    def run_rounds(self, rounds: int, *, drifted: bool | None = None) -> Tally:
        """Each device predicts ``rounds`` inputs (synchronously); returns their tally."""
        tally = Tally()
        use_drift = self.drifted if drifted is None else drifted
        for _ in range(rounds):
            for d in self.devices:
                d.step(self.inputs, use_drift, tally)
        return tally

    def start_traffic(self, rate_hz: float) -> None:
        """Background traffic: every device predicts ``rate_hz`` times a second."""

        def drive() -> None:
            period = 1.0 / rate_hz
            next_t = time.monotonic()
            while not self._stop.is_set():
                t = self.run_rounds(1)
                with self._tally_lock:
                    self._merge(t)
                next_t += period
                self._stop.wait(max(0.0, next_t - time.monotonic()))

        self._stop.clear()
        self._driver = threading.Thread(target=drive, name="sim-traffic", daemon=True)
        self._driver.start()

    def _merge(self, t: Tally) -> None:
        self._tally.predictions += t.predictions
        self._tally.correct += t.correct
        self._tally.failed += t.failed
        for v, (n, ok) in t.by_version.items():
            acc = self._tally.by_version.setdefault(v, [0, 0])
            acc[0] += n
            acc[1] += ok

    def take_tally(self) -> Tally:
        """The background traffic's tally since the last call."""
        with self._tally_lock:
            t, self._tally = self._tally, Tally()
        return t

    def stop_traffic(self) -> None:
        self._stop.set()
        if self._driver:
            self._driver.join(10)
            self._driver = None

    def stop(self) -> None:
        self.stop_traffic()
        for d in self.devices:
            d.agent.stop()


def read_keys(paths: Iterable[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fleet against an existing server until interrupted (used by docker-compose)."""
    p = argparse.ArgumentParser(prog="python -m firmware_sim.fleet", description=main.__doc__)
    p.add_argument("--server", required=True, help="server base URL")
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--trusted-root", help="pinned root metadata v1 (e.g. <data>/trust/1.root.json)")
    p.add_argument("--trusted-key", action="append", default=[], help="LEGACY: PEM public key")
    p.add_argument("--state-root", default="./var/fleet")
    p.add_argument("--rate", type=float, default=2.0, help="inferences per device per second")
    p.add_argument("--drift", action="store_true", help="feed drifted inputs")
    p.add_argument("--id-prefix", default="sim")
    p.add_argument(
        "--bootstrap-token",
        default=os.environ.get("EDGELOOP_AGENT_BOOTSTRAP_TOKEN", ""),
        help="enrollment token (edgeloop devices enroll-token --uses N)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fleet = Fleet(
        FleetConfig(
            server_url=a.server,
            mqtt_host=a.mqtt_host,
            mqtt_port=a.mqtt_port,
            trusted_keys=read_keys(a.trusted_key),
            trusted_root=Path(a.trusted_root).read_bytes() if a.trusted_root else None,
            state_root=Path(a.state_root),
            devices=a.devices,
            id_prefix=a.id_prefix,
            bootstrap_token=a.bootstrap_token,
        )
    )
    fleet.drifted = a.drift
    fleet.start()
    fleet.wait_ready(600)
    fleet.start_traffic(a.rate)
    try:
        while True:
            time.sleep(10)
            t = fleet.take_tally()
            log.info("accuracy %.3f over %d predictions", t.accuracy, t.predictions)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
