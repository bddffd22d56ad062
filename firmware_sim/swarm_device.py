"""One simulated device of the swarm (``firmware_sim.swarm``): asyncio, its own MQTT session.

Each ``SwarmDevice`` is a coroutine-sized edge device: its own aiomqtt session (client id and
username = device id, password = its enrolled credential, clean session, QoS 1 status),
its own artifact download over HTTP with Range (resuming from the bytes it holds), its own
signature check (``device_agent.verify.verify_target``, i.e. the contract's Ed25519 envelope and
manifest code) and hash check of the bytes it downloaded, the agent's status states in the
agent's order, and metrics windows with latency and labelled accuracy.

What is shared, and why (10,000 devices in one process on 2 cores):

- one ``onnxruntime.InferenceSession`` per distinct model (sha256): a device that verified its
  own copy of the bytes attaches to the session built for those bytes (``SharedModels``), and
  its verified copy is interned (identical bytes are held once);
- one keep-alive HTTP connection pool (``firmware_sim.swarm_http``), but one request per device
  and download;
- the parsed pinned root (immutable), and the field input pool.

Per-device state is a small ``Flash`` (what survives a power cut: slots, the job, the partial
download and the unsent reports) plus volatile task handles; a power cut drops the volatile
part and the device boots again from its flash, as the real agent does from its state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import httpx
import numpy as np
import onnxruntime as ort
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contract import DeviceState, MessageError, MetricsReport, StatusReport, TargetMessage, Topics
from contract.manifest import ArtifactRef, Manifest
from contract.messages import MAX_REASON_CHARS, ClassCount
from device_agent.errors import (
    ContentError,
    HashMismatchError,
    LengthError,
    TransportError,
    VersionRefusedError,
)
from device_agent.probation import Action, LiveSummary, ProbationPolicy, judge, quantile
from device_agent.verify import DeviceFacts, ReleaseTrust, verify_installed, verify_target
from firmware_sim.swarm_http import HttpError, HttpPool

log = logging.getLogger("edgeloop.swarm")
S = DeviceState

MISC_INTERVAL_S = 5.0  # seconds between paho housekeeping calls per client (keepalive pings)
STOP_TIMEOUT_S = 30.0  # seconds a cancelled device task may take to end (stop / switch_mode)
STUCK_STACKS_LOGGED = 5  # stacks of stuck tasks logged per swarm
SESSION_EXPIRY_S = 0  # no broker session, as the agent (device_agent/mqtt.py says why)
ACTIVE = frozenset({S.NOTIFIED, S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.PROBATION})
SETTLED = frozenset({S.COMMITTED, S.ALREADY_INSTALLED, S.REFUSED, S.ROLLED_BACK})


class SwarmMqttClient(aiomqtt.Client):
    """aiomqtt's client with a slower housekeeping loop.

    aiomqtt wakes a task per client every second to run paho's ``loop_misc`` (keepalive and
    retry bookkeeping): 10,000 wake-ups a second for a 10,000-device swarm. Every
    ``MISC_INTERVAL_S`` is enough for a keepalive of a minute or more.
    """

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == 0:  # MQTT_ERR_SUCCESS
            await asyncio.sleep(MISC_INTERVAL_S)

    async def retire(self) -> None:
        """Leave the session (DISCONNECT if still connected) and consume how it ended.

        aiomqtt's ``__aexit__`` returns early when the connection has already dropped, leaving
        the "Unexpected disconnection" error in a future nobody reads, which asyncio then logs
        as "Future exception was never retrieved" once per dropped device.
        """
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.__aexit__(None, None, None), 5)
        ended = self._disconnected
        if ended.done() and not ended.cancelled():
            ended.exception()

    def drop(self) -> None:
        """Lose the connection abruptly (no DISCONNECT): a cable pulled or power lost."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class Behaviour:
    """How the devices of one group misbehave (all off: a healthy device)."""

    drift: bool = False  # serves drifted inputs (rotation, blur, contrast loss)
    http_drop_pct: float = 0.0  # % of downloads that break off mid-body (then resume, Range)
    latency_s: float = 0.0  # up to this many seconds added before each network call
    mqtt_drop_pct: float = 0.0  # % of reports before which the MQTT connection drops
    power_loss: str | None = None  # "download" | "install": loses power once in that step
    join_late_s: float | None = None  # joins this many seconds after the rollout is approved


@dataclass
class Installed:
    """A model slot: the signed envelope it was installed under and what it names."""

    envelope: dict[str, Any]
    sha256: str
    model_version: int
    release: int
    rollout_id: int | None = None


@dataclass
class Job:
    state: DeviceState
    target: dict[str, Any]
    key: str  # the envelope's signature: equal targets are the same release
    sha256: str = ""
    release: int = 0
    model_version: int = 0
    attempts: int = 0
    reason: str | None = None


@dataclass
class Flash:
    """What a power cut leaves: the slots, the job, the partial download and unsent reports."""

    current: Installed | None = None
    previous: Installed | None = None
    highest_release: int = 0
    job: Job | None = None
    partial: bytearray = field(default_factory=bytearray)  # downloads/<sha>.part
    model: bytes | None = None  # models/<sha> of the job, once verified (interned)
    refused: set[str] = field(default_factory=set)  # sha256 rolled back on this device
    outbox: deque[tuple[str, bytes, int]] = field(default_factory=deque)  # topic, payload, qos


@dataclass
class Counters:
    """What the whole swarm did (the results file sums them)."""

    reports_sent: int = 0
    metrics_sent: int = 0
    targets_received: int = 0
    mqtt_bytes_out: int = 0  # payload bytes of reports and metrics acknowledged
    mqtt_bytes_in: int = 0  # payload bytes of targets received
    http_requests: int = 0
    http_bytes: int = 0
    http_drops: int = 0
    mqtt_drops: int = 0
    reconnects: int = 0
    connect_errors: int = 0  # connects that failed with something other than an MqttError
    power_cuts: int = 0
    inferences: int = 0
    verify_s: float = 0.0  # seconds spent in signature checks (verify_target)
    verify_calls: int = 0
    hash_s: float = 0.0
    session_builds: int = 0
    stuck_stops: int = 0  # device tasks still running STOP_TIMEOUT_S after being cancelled


class SharedModels:
    """sha256 -> one InferenceSession and one copy of the bytes, for every device holding them."""

    def __init__(self, counters: Counters) -> None:
        self._sessions: dict[str, tuple[ort.InferenceSession, str]] = {}
        self._bytes: dict[str, bytes] = {}
        self.counters = counters

    def intern(self, sha256: str, data: bytes | bytearray) -> bytes:
        """The one copy of verified bytes ``sha256`` (the caller checked the hash)."""
        have = self._bytes.get(sha256)
        if have is None:
            have = self._bytes[sha256] = bytes(data)
        return have

    def session(self, sha256: str, data: bytes) -> tuple[ort.InferenceSession, str]:
        got = self._sessions.get(sha256)
        if got is None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            got = self._sessions[sha256] = (sess, sess.get_inputs()[0].name)
            self.counters.session_builds += 1
        return got

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class FieldInputs:
    """The digits field pool (clean and, when a group drifts, drifted) with its labels."""

    clean: np.ndarray
    drifted: np.ndarray | None
    labels: np.ndarray


@dataclass
class DeviceConfig:
    """Knobs shared by every device of a swarm (units in comments)."""

    server_url: str
    mqtt_host: str
    mqtt_port: int
    model_line: str = "digits"
    mode: str = "push"  # "push": targets over MQTT; "poll": GET .../target every poll_s
    poll_s: float = 60.0  # seconds between target polls (poll mode)
    mqtt_keepalive_s: int = 120  # seconds
    metrics_interval_s: float = 20.0  # seconds per metrics window
    rate_hz: float = 0.5  # inferences per second of steady traffic per device
    probation_s: float = 1.0  # seconds the labelled probation traffic is spread over
    probation_steps: int = 1  # batches the probation traffic comes in
    # The agent's policy, judged on 100 labels: on 15-30 labels its accuracy test rolled back
    # ~3 % of devices of an unchanged-quality model (13/15 right vs 47/47 before: z = 2.5).
    probation: ProbationPolicy = field(
        default_factory=lambda: ProbationPolicy(min_labelled=100, max_s=60.0)
    )
    download_retries: int = 5  # attempts per download before FAILED
    retry_base_s: float = 2.0  # seconds, first FAILED retry (doubled, capped at 8x)
    max_artifact_bytes: int = 64 * 1024 * 1024  # bytes
    # MQTT over TLS: one verified client context shared by every device (None: plain MQTT).
    mqtt_tls_context: ssl.SSLContext | None = None


class SwarmContext:
    """The shared pieces every device of one swarm uses (see the module docstring)."""

    def __init__(
        self,
        config: DeviceConfig,
        *,
        trust: ReleaseTrust,
        inputs: FieldInputs,
        http: httpx.AsyncClient,
        connect_slots: int = 64,
        http_slots: int = 64,
    ) -> None:
        self.config = config
        self.trust = trust
        self.inputs = inputs
        self.http = http
        self.topics = Topics()
        self.counters = Counters()
        self.models = SharedModels(self.counters)
        self.connect_slots = asyncio.Semaphore(connect_slots)  # CONNECTs in flight
        # HTTP requests in flight. httpcore's pool rescans every queued request on each
        # assignment (O(queued x connections)): with 10,000 downloads queued inside it the
        # event loop spends most of its time there, so requests wait here instead.
        self.http_slots = asyncio.Semaphore(http_slots)
        self.pool = HttpPool(max_connections=http_slots)  # devices' downloads and polls
        self.runtime_version = ort.__version__
        self.on_change: Callable[[SwarmDevice], None] = lambda _d: None  # progress hook


class SimulatedPowerLoss(Exception):
    """Raised inside a device's update step where its power fails (then it boots again)."""


def _now() -> float:
    return time.time()


class SwarmDevice:
    """One device: flash + the tasks that run its MQTT session, its updates and its polls."""

    def __init__(
        self,
        ctx: SwarmContext,
        device_id: str,
        credential: str,
        *,
        group: str = "default",
        behaviour: Behaviour | None = None,
        seed: int = 0,
    ) -> None:
        self.ctx = ctx
        self.device_id = device_id
        self.credential = credential
        self.group = group
        self.behaviour = behaviour or Behaviour()
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.flash = Flash()
        self.facts = DeviceFacts(device_id=device_id, runtime_version=ctx.runtime_version)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()  # a target is waiting in ``_next``
        self._next: TargetMessage | None = None
        self._outbox_ready = asyncio.Event()
        self._mqtt: SwarmMqttClient | None = None
        self.online = False
        self.booted = False
        self.power_loss_pending = self.behaviour.power_loss
        # Serving (volatile: rebuilt from flash at boot).
        self._session: tuple[ort.InferenceSession, str] | None = None
        self.serving_version: int | None = None
        # Steady-traffic window (per served version) and the baseline before a swap.
        self._window: dict[int, list[Any]] = {}
        self._window_start = _now()
        self._baseline = LiveSummary()
        # Timeline and outcome (for the results file).
        self.times: dict[str, float] = {}  # first time of: target_rx, swap, commit, ...
        self.reports: list[tuple[str, float]] = []  # (state, ts) of every status report made
        self.last_state: DeviceState = S.IDLE
        self.last_reason: str | None = None
        self.http_bytes = 0
        self.mqtt_bytes = 0  # payload bytes in and out
        self.mode = ctx.config.mode  # "push" or "poll" (switch_mode changes it)
        self.reboot_s = 2.0  # seconds without power after a power cut (jittered)
        self._manifest_cache: tuple[str, Manifest] | None = None
        self._last_summary = LiveSummary()  # the serving version's last closed window

    # ------------------------------------------------------------------ lifecycle

    def factory_install(self, target: TargetMessage, manifest: Manifest, data: bytes) -> None:
        """Provision the device with the line's current model, as a factory image would."""
        rec = Installed(
            dict(target.envelope),
            manifest.artifact.sha256,
            manifest.model_version,
            manifest.release,
            target.rollout_id,
        )
        self.flash.current = rec
        self.flash.highest_release = manifest.release
        self.ctx.models.intern(rec.sha256, data)

    def boot(self) -> None:
        """Power on: re-verify the installed slot, serve it, connect, resume any job."""
        self.booted = True
        cur = self.flash.current
        if cur is not None:
            verify_installed(
                cur.envelope,
                self.ctx.trust,
                model_line=self.ctx.config.model_line,
                sha256=cur.sha256,
            )
            self._serve(cur)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connection_loop()),
            loop.create_task(self._update_loop()),
        ]
        if self.mode == "poll":
            self._tasks.append(loop.create_task(self._poll_loop()))
        if self.flash.outbox:
            self._outbox_ready.set()

    def _power_back(self) -> None:
        """Power returns after a cut, unless something booted the device meanwhile (a mode
        switch): a second boot would run two connection loops under one client id."""
        if not self.booted:
            self.boot()

    def power_cut(self) -> None:
        """Lose power now: tasks, connection and serving session go; the flash stays."""
        self.ctx.counters.power_cuts += 1
        self.times.setdefault("power_cut", _now())
        if self._mqtt is not None:
            self._mqtt.drop()
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        self._mqtt = None
        self.online = False
        self._session = None
        self.serving_version = None
        self._manifest_cache = None
        self._next = None
        self._wake.clear()
        self._window.clear()
        self.booted = False

    async def switch_mode(self, mode: str) -> None:
        """Reconnect as a push (MQTT target) or poll (HTTP target) device; flash kept."""
        await self.stop()
        self.mode = mode
        self.boot()

    async def stop(self) -> None:
        """Cancel the device's tasks and wait for them to end, at most ``STOP_TIMEOUT_S``.

        A task that has not ended by then is counted (``stuck_stops``) and its stack is logged
        once per swarm, so a mode switch of the whole fleet cannot hang on one device without
        saying where; the task is left cancelled.
        """
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        for t in pending:
            self.ctx.counters.stuck_stops += 1
            if self.ctx.counters.stuck_stops <= STUCK_STACKS_LOGGED:
                buf = io.StringIO()
                t.print_stack(limit=12, file=buf)
                log.warning(
                    "%s: a task did not end %.0f s after it was cancelled: %s",
                    self.device_id,
                    STOP_TIMEOUT_S,
                    buf.getvalue(),
                )
        for t in _done:
            if not t.cancelled():
                t.exception()  # consumed: a task that failed while stopping is not news here

    # ------------------------------------------------------------------ MQTT session

    def _new_client(self) -> SwarmMqttClient:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        cfg = self.ctx.config
        return SwarmMqttClient(
            cfg.mqtt_host,
            cfg.mqtt_port,
            identifier=self.device_id,
            username=self.device_id,
            password=self.credential,
            protocol=aiomqtt.ProtocolVersion.V5,
            # As the agent: no broker session; a push device subscribes on every connect and
            # gets its retained target, a polling device does not subscribe at all.
            clean_start=True,
            properties=props,
            keepalive=cfg.mqtt_keepalive_s,
            timeout=30,
            tls_context=cfg.mqtt_tls_context,
        )

    async def _connection_loop(self) -> None:
        backoff = 1.0
        first = True
        while True:
            client = self._new_client()
            try:
                async with self.ctx.connect_slots:
                    await self._delay()
                    await client.__aenter__()
            except Exception as exc:  # noqa: BLE001 - any failed connect is retried, never fatal
                # aiomqtt turns most socket errors into MqttError, but not all (a timeout in
                # the TLS-less connect, a refused socket during a broker restart): a device
                # that gives up here would stay offline for the rest of the run.
                if not isinstance(exc, aiomqtt.MqttError):
                    self.ctx.counters.connect_errors += 1
                await asyncio.sleep(backoff * (0.5 + self.rng.random()))
                backoff = min(backoff * 2, 30.0)
                continue
            if not first:
                self.ctx.counters.reconnects += 1
            first, backoff = False, 1.0
            self._mqtt = client
            try:
                if self.mode == "push":
                    await client.subscribe(self.ctx.topics.target(self.device_id), qos=1)
                self.online = True
                await _first_error(self._send_outbox(client), self._receive(client))
            except aiomqtt.MqttError:
                pass
            finally:
                self.online = False
                self._mqtt = None
                await client.retire()
            await asyncio.sleep(backoff * (0.5 + self.rng.random()))

    async def _receive(self, client: SwarmMqttClient) -> None:
        async for message in client.messages:
            self.ctx.counters.targets_received += 1
            payload = message.payload
            if isinstance(payload, bytes | bytearray | str):
                self.ctx.counters.mqtt_bytes_in += len(payload)
                self.mqtt_bytes += len(payload)
                self._offer_raw(payload)

    async def _send_outbox(self, client: SwarmMqttClient) -> None:
        box = self.flash.outbox
        while True:
            await self._outbox_ready.wait()
            while box:
                topic, payload, qos = box[0]
                if self.behaviour.mqtt_drop_pct and self.rng.random() * 100 < (
                    self.behaviour.mqtt_drop_pct
                ):
                    self.ctx.counters.mqtt_drops += 1
                    client.drop()
                    raise aiomqtt.MqttError("simulated connection drop")
                await self._delay()
                await client.publish(topic, payload, qos=qos, timeout=60)
                box.popleft()  # acknowledged (QoS 1) or handed to the socket (QoS 0)
                _raise_if_cancelled()
                self.ctx.counters.mqtt_bytes_out += len(payload)
                self.mqtt_bytes += len(payload)
                if qos:
                    self.ctx.counters.reports_sent += 1
                else:
                    self.ctx.counters.metrics_sent += 1
            self._outbox_ready.clear()

    def _queue(self, topic: str, payload: bytes, qos: int) -> None:
        self.flash.outbox.append((topic, payload, qos))
        self._outbox_ready.set()

    async def _delay(self) -> None:
        if self.behaviour.latency_s:
            await asyncio.sleep(self.rng.random() * self.behaviour.latency_s)

    # ------------------------------------------------------------------ targets

    def _offer_raw(self, payload: bytes | bytearray | str) -> None:
        try:
            target = TargetMessage.from_dict(
                payload if isinstance(payload, str) else bytes(payload)
            )
        except MessageError as exc:
            self.report(S.REFUSED, None, f"target message invalid: {exc}")
            return
        self.offer(target)

    def offer(self, target: TargetMessage) -> None:
        """A target arrived (MQTT or poll): start on it unless it is what we run or work on."""
        key = _key(target.envelope)
        cur = self.flash.current
        job = self.flash.job
        if cur is not None and _key(cur.envelope) == key and (job is None or job.key == key):
            return  # the retained target re-delivered: already serving it
        if job is not None and job.key == key and (job.state in ACTIVE or job.state == S.FAILED):
            return  # already on it (or waiting to retry it)
        if job is not None and job.key == key and job.state in SETTLED:
            return  # settled on exactly this target already
        self._next = target
        self._wake.set()

    async def _poll_loop(self) -> None:
        cfg = self.ctx.config
        url = f"{cfg.server_url}/api/v1/devices/{self.device_id}/target"
        headers = {"Authorization": f"Bearer {self.credential}"}
        await asyncio.sleep(self.rng.random() * cfg.poll_s)  # devices boot at random phases
        while True:
            try:
                await self._delay()
                async with self.ctx.pool.get(url, headers) as resp:
                    body = await resp.read()
                self.ctx.counters.http_requests += 1
                self.ctx.counters.http_bytes += len(body)
                self.http_bytes += len(body)
                if resp.status_code == 200:
                    self._offer_raw(body)
            except (HttpError, OSError, TimeoutError):
                pass
            await asyncio.sleep(cfg.poll_s)

    # ------------------------------------------------------------------ the update machine

    async def _update_loop(self) -> None:
        try:
            job = self.flash.job
            if job is not None and job.state in ACTIVE | {S.FAILED}:
                await self._run_job()  # resume after a power cut
            while True:
                await self._wake.wait()
                self._wake.clear()
                target, self._next = self._next, None
                if target is None:
                    continue
                self.flash.job = Job(S.NOTIFIED, target.to_dict(), _key(target.envelope))
                self.flash.partial = bytearray()
                self.flash.model = None
                await self._run_job()
        except SimulatedPowerLoss:
            # Cut from outside this task (power_cut cancels it), then boot again later.
            loop = asyncio.get_running_loop()
            loop.call_soon(self.power_cut)
            loop.call_later(self.reboot_s * (0.5 + self.rng.random()), self._power_back)

    async def _run_job(self) -> None:
        while True:
            job = self.flash.job
            assert job is not None
            if job.state == S.FAILED:
                delay = self.ctx.config.retry_base_s * min(8, 2 ** max(0, job.attempts - 1))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay * (0.5 + self.rng.random()))
                _raise_if_cancelled()
                if self._next is not None:
                    return  # a newer target wins over the retry
                job.state = S.NOTIFIED
            if job.state not in ACTIVE:
                return
            try:
                await self._step(job)
            except SimulatedPowerLoss:
                raise
            except ContentError as exc:
                self._settle_error(S.REFUSED, job, exc)
                return
            except Exception as exc:  # transport, disk, model load: FAILED, retried
                self._settle_error(S.FAILED, job, exc)

    def _enter(self, job: Job, state: DeviceState) -> None:
        job.state = state  # persisted (flash) before the step acts
        self.report(state, job)

    def _manifest(self, job: Job) -> Manifest:
        """The job's target, verified (cached per job in RAM: a boot verifies it again)."""
        if self._manifest_cache is not None and self._manifest_cache[0] == job.key:
            return self._manifest_cache[1]
        target = TargetMessage.from_dict(job.target)
        t0 = time.perf_counter()
        trust, _applied = self.ctx.trust.with_roots(list(target.roots))
        manifest = verify_target(
            target,
            trust,
            model_line=self.ctx.config.model_line,
            highest_release=self.flash.highest_release,
            now=datetime.now(UTC),
            device=self.facts,
        )
        self.ctx.counters.verify_s += time.perf_counter() - t0
        self.ctx.counters.verify_calls += 1
        self._manifest_cache = (job.key, manifest)
        return manifest

    async def _step(self, job: Job) -> None:
        manifest = self._manifest(job)  # every step re-checks the signature, as after a boot
        ref = manifest.artifact
        if job.state == S.NOTIFIED:
            job.sha256, job.release = ref.sha256, manifest.release
            job.model_version = manifest.model_version
            self.times.setdefault(f"notified:{job.release}", _now())
            if ref.sha256 in self.flash.refused:
                raise VersionRefusedError(
                    f"release {job.release} (model version {job.model_version}) was rolled "
                    "back on this device"
                )
            self.report(S.NOTIFIED, job)
            cur = self.flash.current
            if cur is not None and cur.sha256 == ref.sha256:
                self.flash.current = self._record(job, manifest)
                self.flash.highest_release = max(self.flash.highest_release, job.release)
                self._enter(job, S.ALREADY_INSTALLED)
                return
            if ref.size > self.ctx.config.max_artifact_bytes:
                raise LengthError(f"artifact of {ref.size} bytes exceeds the cap")
            self._enter(job, S.DOWNLOADING)
        elif job.state == S.DOWNLOADING:
            await self._download(job.target["artifact_url"], ref)
            self._enter(job, S.VERIFYING)
        elif job.state == S.VERIFYING:
            t0 = time.perf_counter()
            try:
                check_bytes(self.flash.partial, ref)
            except ContentError:
                self.flash.partial = bytearray()  # never resume from bytes that failed
                if job.attempts == 0:
                    job.attempts = 1
                    self._enter(job, S.DOWNLOADING)
                    return
                raise
            finally:
                self.ctx.counters.hash_s += time.perf_counter() - t0
            self.flash.model = self.ctx.models.intern(ref.sha256, self.flash.partial)
            self.flash.partial = bytearray()
            self._enter(job, S.INSTALLING)
        elif job.state == S.INSTALLING:
            if self.power_loss_pending == "install":
                self.power_loss_pending = None
                raise SimulatedPowerLoss("install")
            data = self.flash.model
            if data is None:  # lost before it was kept: fetch again
                self._enter(job, S.DOWNLOADING)
                return
            check_bytes(data, ref)  # the hash is checked right before activation
            session = self.ctx.models.session(ref.sha256, data)
            old = self.flash.current
            rec = self._record(job, manifest)
            first = old is None or self._session is None or old.sha256 == rec.sha256
            self.flash.previous = old if old is not None and old.sha256 != rec.sha256 else None
            self.flash.current = rec
            if not first:
                self._baseline = self._close_window_summary()
            self._swap(session, rec.model_version)
            self.times.setdefault(f"swap:{job.release}", _now())
            self.report(S.INSTALLED, job)
            if first:
                self.flash.highest_release = max(self.flash.highest_release, job.release)
                job.reason = "first install: nothing to compare"
                self._enter(job, S.COMMITTED)
                self._committed(job)
                return
            job.reason = None
            self._enter(job, S.PROBATION)
        elif job.state == S.PROBATION:
            await self._probation(job)

    def _record(self, job: Job, manifest: Manifest) -> Installed:
        return Installed(
            dict(job.target["envelope"]),
            manifest.artifact.sha256,
            manifest.model_version,
            manifest.release,
            job.target.get("rollout_id"),
        )

    async def _download(self, url: str, ref: ArtifactRef) -> None:
        """Complete ``flash.partial`` to the signed size (Range from the bytes held)."""
        attempts = self.ctx.config.download_retries
        for attempt in range(attempts):
            try:
                await self._fetch_once(url, ref)
                return
            except TransportError:
                if attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + self.rng.random()))

    async def _fetch_once(self, url: str, ref: ArtifactRef) -> None:
        part = self.flash.partial
        if len(part) > ref.size:
            part.clear()
        if len(part) == ref.size:
            return
        headers = {"Accept-Encoding": "identity"}
        have = len(part)
        if have:
            headers["Range"] = f"bytes={have}-"
        drop_at = None
        if self.behaviour.http_drop_pct and self.rng.random() * 100 < self.behaviour.http_drop_pct:
            drop_at = have + max(1, int((ref.size - have) * self.rng.random()))
        cut_at = None
        if self.power_loss_pending == "download":
            cut_at = have + max(1, (ref.size - have) // 2)
        await self._delay()
        self.ctx.counters.http_requests += 1
        try:
            async with self.ctx.pool.get(url, headers) as resp:
                if resp.status_code == 206 and have:
                    if not resp.headers.get("content-range", "").startswith(f"bytes {have}-"):
                        part.clear()
                        raise TransportError(f"Content-Range {resp.headers.get('content-range')}")
                elif resp.status_code == 200:
                    part.clear()
                else:
                    if resp.status_code == 416:
                        part.clear()
                    raise TransportError(f"GET {url}: HTTP {resp.status_code}")
                async for chunk in resp.iter_bytes(16384):
                    if len(part) + len(chunk) > ref.size:
                        part.clear()
                        raise LengthError(f"server sent more than the signed {ref.size} bytes")
                    if cut_at is not None and len(part) + len(chunk) >= cut_at:
                        part.extend(chunk[: cut_at - len(part)])
                        self.power_loss_pending = None
                        raise SimulatedPowerLoss("download")
                    if drop_at is not None and len(part) + len(chunk) >= drop_at:
                        part.extend(chunk[: drop_at - len(part)])
                        self.ctx.counters.http_drops += 1
                        raise TransportError("connection dropped mid-body (simulated)")
                    part.extend(chunk)
                    self.ctx.counters.http_bytes += len(chunk)
                    self.http_bytes += len(chunk)
        except (HttpError, OSError, TimeoutError) as exc:
            raise TransportError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if len(part) < ref.size:
            raise TransportError(f"GET {url}: body ended after {len(part)} of {ref.size} bytes")

    async def _probation(self, job: Job) -> None:
        """Serve labelled traffic on the new model over ``probation_s``; commit or roll back."""
        cfg = self.ctx.config
        policy = cfg.probation
        t0 = time.monotonic()
        per_step = max(1, math.ceil(policy.min_labelled / max(1, cfg.probation_steps)))
        n = ok = 0
        lat: list[float] = []
        while True:
            await asyncio.sleep(cfg.probation_s / max(1, cfg.probation_steps))
            got, correct, ms = self._infer(per_step)
            n, ok = n + got, ok + correct
            lat.extend([ms] * got)
            ordered = sorted(lat)
            trial = LiveSummary(
                inferences=n,
                labelled=n,
                correct=ok,
                latency_samples=len(lat),
                p95_ms=quantile(ordered, 0.95),
                p50_ms=quantile(ordered, 0.50),
            )
            verdict = judge(trial, self._baseline, time.monotonic() - t0, policy)
            if verdict.action == Action.CONTINUE:
                continue
            self._send_metrics(close_all=True)  # the probation window, before the verdict
            if verdict.action == Action.COMMIT:
                self.flash.highest_release = max(self.flash.highest_release, job.release)
                job.reason = verdict.reason
                self._enter(job, S.COMMITTED)
                self._committed(job)
            else:
                self._rollback(job, verdict.reason)
            return

    def _committed(self, job: Job) -> None:
        self.flash.previous = None
        self.flash.model = None
        self.times.setdefault(f"commit:{job.release}", _now())
        self.ctx.on_change(self)

    def _rollback(self, job: Job, reason: str) -> None:
        self.flash.refused.add(job.sha256)
        prev = self.flash.previous
        self.flash.current, self.flash.previous = prev, None
        if prev is not None:
            data = self.ctx.models._bytes.get(prev.sha256)  # noqa: SLF001 - our own flash copy
            if data is not None:
                self._swap(self.ctx.models.session(prev.sha256, data), prev.model_version)
        job.reason = reason
        self._enter(job, S.ROLLED_BACK)
        self.ctx.on_change(self)

    def _settle_error(self, state: DeviceState, job: Job, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        if state == S.FAILED:
            job.attempts += 1
        job.reason = reason
        job.state = state
        self.report(state, job if job.release else None, reason, target=job.target)
        self.ctx.on_change(self)

    # ------------------------------------------------------------------ serving and metrics

    def _serve(self, rec: Installed) -> None:
        data = self.ctx.models._bytes.get(rec.sha256)  # noqa: SLF001 - our own flash copy
        if data is None:
            raise LengthError(f"installed artifact {rec.sha256[:12]} is missing")
        self._swap(self.ctx.models.session(rec.sha256, data), rec.model_version)

    def _swap(self, session: tuple[ort.InferenceSession, str], version: int) -> None:
        self._session = session
        self.serving_version = version

    def _infer(self, n: int) -> tuple[int, int, float]:
        """Serve ``n`` labelled field inputs (one batch); returns (n, correct, ms per input)."""
        if self._session is None or self.serving_version is None or n <= 0:
            return 0, 0, 0.0
        inputs = self.ctx.inputs
        pool = (
            inputs.drifted if self.behaviour.drift and inputs.drifted is not None else inputs.clean
        )
        idx = self.np_rng.integers(0, len(inputs.labels), n)
        sess, name = self._session
        t0 = time.perf_counter()
        probs = sess.run(None, {name: pool[idx]})[0]
        ms = (time.perf_counter() - t0) * 1000 / n
        pred = probs.argmax(axis=1)
        truth = inputs.labels[idx]
        hits = pred == truth
        w = self._window.setdefault(self.serving_version, [0, 0, [], {}])
        w[0] += n
        w[1] += int(hits.sum())
        w[2].append(ms)
        classes: dict[int, list[int]] = w[3]
        for t, p, h in zip(truth.tolist(), pred.tolist(), hits.tolist(), strict=True):
            c = classes.setdefault(t, [0, 0, 0])
            c[0] += 1
            c[1] += h
            classes.setdefault(p, [0, 0, 0])[2] += 1
        self.ctx.counters.inferences += n
        return n, int(hits.sum()), ms

    def traffic(self) -> None:
        """One steady-traffic window: serve it (one batch) and report its metrics."""
        if not self.booted or self._session is None:
            return
        window = _now() - self._window_start
        n = max(1, round(self.ctx.config.rate_hz * window))
        self._infer(n)
        self._send_metrics(close_all=True)

    def _close_window_summary(self) -> LiveSummary:
        """The serving version's window so far, as the probation baseline."""
        w = self._window.get(self.serving_version or -1)
        if not w or not w[0]:
            return self._last_summary
        return _summary(w)

    def _send_metrics(self, *, close_all: bool) -> None:
        now = _now()
        window_s = max(0.001, now - self._window_start)
        for version, (n, ok, lat, classes) in sorted(self._window.items()):
            if not n:
                continue
            report = MetricsReport(
                device_id=self.device_id,
                ts=now,
                model_line=self.ctx.config.model_line,
                model_version=version,
                window_s=window_s,
                inferences=n,
                errors=0,
                labelled=n,
                correct=ok,
                latency_ms_p50=float(np.median(lat)) if lat else 0.0,
                latency_ms_p95=_p95(lat) or 0.0,
                class_counts=tuple(
                    ClassCount(k, s, c, p) for k, (s, c, p) in sorted(classes.items())
                ),
            )
            self._queue(self.ctx.topics.metrics(self.device_id), report.to_json(), 0)
        if close_all:
            w = self._window.get(self.serving_version or -1)
            if w and w[0]:
                self._last_summary = _summary(w)
            self._window = {}
            self._window_start = now

    def report(
        self,
        state: DeviceState,
        job: Job | None,
        reason: str | None = None,
        *,
        target: dict[str, Any] | None = None,
    ) -> None:
        """A status report, kept in the flash outbox until the broker acknowledged it."""
        self.last_state = state
        reason = reason if reason is not None else (job.reason if job is not None else None)
        self.last_reason = reason
        tgt = job.target if job is not None else target
        ts = _now()
        report = StatusReport(
            device_id=self.device_id,
            ts=ts,
            state=state,
            model_line=self.ctx.config.model_line,
            model_version=self.serving_version,
            release=self.flash.highest_release or None,
            rollout_id=tgt.get("rollout_id") if tgt else None,
            target_release=job.release if job is not None and job.release else None,
            reason=reason[:MAX_REASON_CHARS] if reason else None,
        )
        self.reports.append((state.value, ts))
        self._queue(self.ctx.topics.status(self.device_id), report.to_json(), 1)
        self.ctx.on_change(self)


def check_bytes(data: bytes | bytearray, ref: ArtifactRef) -> None:
    """Size and sha256 of downloaded bytes against the signed reference (as
    ``device_agent.verify.verify_artifact`` checks a file). Raises LengthError /
    HashMismatchError."""
    if len(data) != ref.size:
        raise LengthError(f"artifact size is {len(data)} bytes, the signed size is {ref.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise HashMismatchError(f"artifact sha256 {digest[:16]}... != signed {ref.sha256[:16]}...")


def _key(envelope: dict[str, Any]) -> str:
    """Identity of a signed target: its signatures (a new release is a new signature)."""
    sigs = envelope.get("signatures") or []
    return json.dumps(sigs, sort_keys=True) if sigs else json.dumps(envelope, sort_keys=True)


def _summary(w: list[Any]) -> LiveSummary:
    """A traffic window ``[n, correct, latencies, classes]`` as the probation's LiveSummary."""
    ordered = sorted(w[2])
    return LiveSummary(
        inferences=w[0],
        labelled=w[0],
        correct=w[1],
        latency_samples=len(ordered),
        p95_ms=quantile(ordered, 0.95),
        p50_ms=quantile(ordered, 0.50),
    )


def _p95(values: list[float]) -> float | None:
    return quantile(sorted(values), 0.95)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that an ``asyncio.wait_for`` swallowed.

    On Python 3.11, ``wait_for`` returns its awaitable's result when the awaitable completes in
    the same loop iteration as the cancellation of the task awaiting it (CPython gh-86296, fixed
    in 3.12), leaving the task "cancelling" but running. Seen in the 10,000-device benchmark: 5
    devices' outbox tasks went on to wait for their next report forever after a mode switch
    cancelled them in the middle of a publish (aiomqtt waits for the PUBACK with wait_for).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _first_error(*coros: Any) -> None:
    """Run the coroutines until the first one ends (or raises); cancel the others; re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    for t in done:
        exc = t.exception()
        if exc is not None:
            raise exc
