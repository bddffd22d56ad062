"""Helpers for the device agent tests: tiny ONNX models, signed targets, and a real local HTTP
server that plays the edgeloop server (artifacts with fault switches, samples, register, target).
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from contract.manifest import ArtifactRef, InputSpec, Manifest
from contract.messages import TargetMessage
from device_agent.config import AgentConfig
from device_agent.http import HttpClient

FEATURES = 64
CLASSES = 10
LINE = "digits"


def model_weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (FEATURES, CLASSES)).astype(np.float32)


def make_model(seed: int) -> bytes:
    """input "input" float32 [N,64] -> MatMul(W) -> Softmax -> "probabilities" [N,10]."""
    w = numpy_helper.from_array(model_weights(seed), name="W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        f"digits_{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_big_model(seed: int, tag: str, hidden: int = 2048) -> bytes:
    """Same predictions as ``make_model(seed)`` through a wide detour (x @ [I|0] @ [W;0]), so
    the file is ~``hidden`` * 0.3 KB; ``tag`` changes the bytes (and sha) but not the answers."""
    a = np.zeros((FEATURES, hidden), dtype=np.float32)
    a[:, :FEATURES] = np.eye(FEATURES, dtype=np.float32)
    b = np.zeros((hidden, CLASSES), dtype=np.float32)
    b[:FEATURES] = model_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "A"], ["wide"]),
            helper.make_node("MatMul", ["wide", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        f"digits_{seed}_{tag}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def with_selftest(data: bytes, inputs: np.ndarray, labels: list[int]) -> bytes:
    """Embed self-test vectors (metadata ``edgeloop.selftest``) into an ONNX model."""
    model = onnx.load_from_string(data)
    entry = model.metadata_props.add()
    entry.key = "edgeloop.selftest"
    entry.value = json.dumps({"inputs": inputs.tolist(), "labels": labels})
    return model.SerializeToString()


def truth_label(seed: int, x: np.ndarray) -> int:
    return int(np.argmax(reference_probs(seed, x)))


def reference_probs(seed: int, x: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float32).reshape(1, FEATURES) @ model_weights(seed)
    e = np.exp(logits - logits.max())
    return (e / e.sum())[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_manifest(
    data: bytes,
    *,
    release: int,
    model_version: int,
    model_line: str = LINE,
    now: datetime | None = None,
    expires_in: timedelta = timedelta(days=30),
    name: str = "model.onnx",
) -> Manifest:
    now = now or datetime.now(UTC)
    return Manifest(
        model_line=model_line,
        release=release,
        model_version=model_version,
        artifact=ArtifactRef(name=name, sha256=sha256(data), size=len(data)),
        input_spec=InputSpec(name="input", shape=(-1, FEATURES), dtype="float32", min=0, max=16),
        labels=tuple(str(i) for i in range(CLASSES)),
        created_at=now - timedelta(minutes=1),
        expires_at=now + expires_in,
    )


def make_target(
    manifest: Manifest, key: Ed25519PrivateKey, url: str, *, rollout_id: int | None = None
) -> TargetMessage:
    return TargetMessage(
        model_line=manifest.model_line,
        envelope=manifest.sign([key]).to_dict(),
        artifact_url=url,
        rollout_id=rollout_id,
    )


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


FAKE_BOOTSTRAP_TOKEN = "fake-bootstrap-token"


def make_config(state_dir: Path, key: Ed25519PrivateKey, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "device_id": "dev-1",
        "model_line": LINE,
        "bootstrap_token": FAKE_BOOTSTRAP_TOKEN,  # FakeServer enrolls with it
        "state_dir": state_dir,
        "trusted_keys": [public_pem(key)],
        "server_url": "http://127.0.0.1:9",  # discard port: nothing listens
        "mqtt_port": 9,
        "download_retries": 0,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        "connect_retry_s": 0.1,
        "http_timeout_s": 5.0,
        "upload_interval_s": 0.05,
        "upload_backoff_cap_s": 0.2,
        "metrics_interval_s": 0.2,
        "mqtt_reconnect_min_s": 1,
        "mqtt_reconnect_max_s": 2,
        "update_retry_s": 0.2,
        "probation_max_s": 0.0,  # commit at the first probation check unless a test overrides
        "min_free_memory_bytes": 0,
    }
    values.update(overrides)
    return AgentConfig(**values)


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until truthy; fail after a generous deadline (never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@dataclass
class FakeServer:
    """A real HTTP server in a thread, implementing the endpoints the agent calls.

    Artifact fault switches (``mode``): "normal", "truncate" (close-delimited body cut at half),
    "drop_once" (declared length, connection dropped after ``drop_after`` bytes, once),
    "wrong_bytes" (same length, other bytes), "ignore_range" (always 200 full body),
    "oversize" (the artifact followed by ``oversize_extra`` junk bytes, no Content-Length).
    """

    artifacts: dict[str, bytes] = field(default_factory=dict)
    mode: str = "normal"
    drop_after: int = 1000
    oversize_extra: int = 64 * 1024 * 1024
    log: list[dict[str, Any]] = field(default_factory=list)
    sample_statuses: list[int] = field(default_factory=list)  # popped per request; then 200
    received_ids: list[str] = field(default_factory=list)  # every sample id in every request
    acked_ids: list[str] = field(default_factory=list)  # ids in requests answered 2xx
    registrations: list[dict[str, Any]] = field(default_factory=list)
    target: bytes | None = None  # GET /api/v1/devices/{id}/target body, 404 if None
    throttle_bps: float | None = None  # artifact bytes per second (slow link), None = full speed
    # Identity, as the real server does it: a bootstrap token buys one credential per device;
    # device routes need "Authorization: Bearer <credential>" of that very device (else 401/403).
    bootstrap_tokens: set[str] = field(default_factory=lambda: {FAKE_BOOTSTRAP_TOKEN})
    credentials: dict[str, str] = field(default_factory=dict)  # credential -> device_id
    enrollments: list[dict[str, Any]] = field(default_factory=list)
    one_time_tokens: bool = False  # default: a fleet-wide multi-use token
    revoked: set[str] = field(default_factory=set)  # device ids refused with 403
    auth_refusals: list[tuple[str, int]] = field(default_factory=list)  # (path, status)
    # GET path -> the whole raw response (status line, headers, body) written as it is, then
    # the connection is closed: a hostile server's headers and bytes. Logged in ``log``.
    raw_responses: dict[str, bytes] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None  # serve https with this server context (netkit.tls_files)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeServer:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host!s}:{port}"

    def issue(self, device_id: str) -> str:
        """A credential for ``device_id`` (as if it had enrolled)."""
        credential = f"cred-{device_id}-issued-{len(self.credentials)}"
        with self.lock:
            self.credentials[credential] = device_id
        return credential

    def add(self, name: str, data: bytes) -> str:
        self.artifacts[name] = data
        return f"{self.url}/artifacts/{name}"

    def requests_for(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.log if e["path"] == f"/artifacts/{name}"]


def device_http(srv: FakeServer, device_id: str = "dev-1", timeout_s: float = 5.0) -> HttpClient:
    """An agent HTTP client that sends ``device_id``'s credential to ``srv``."""
    client = HttpClient(timeout_s=timeout_s)
    client.set_bearer(srv.issue(device_id), origin=srv.url)
    return client


_RANGE = re.compile(r"^bytes=(\d+)-$")
_CHUNK = 64 * 1024


def _make_handler(srv: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _device(self, device_id: str | None) -> bool:
            """Check the bearer credential speaks for ``device_id``; answer 401/403 if not."""
            auth = self.headers.get("Authorization") or ""
            holder = srv.credentials.get(auth.removeprefix("Bearer ").strip())
            status = 0
            if holder is None:
                status = 401
            elif holder in srv.revoked or (device_id is not None and holder != device_id):
                status = 403
            if status:
                with srv.lock:
                    srv.auth_refusals.append((self.path, status))
                self._json(status, {"detail": f"refused ({holder or 'no credential'})"})
                return False
            return True

        def do_GET(self) -> None:
            raw = srv.raw_responses.get(self.path)
            if raw is not None:
                with srv.lock:
                    srv.log.append({"path": self.path, "range": self.headers.get("Range")})
                self.close_connection = True
                try:
                    self.wfile.write(raw)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return
            if self.path.startswith("/artifacts/"):
                self._artifact()
            elif m := re.fullmatch(r"/api/v1/devices/([^/]+)/target", self.path):
                if not self._device(m.group(1)):
                    return
                if srv.target is None:
                    self._json(404, {"detail": "no target"})
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(srv.target)))
                    self.end_headers()
                    self.wfile.write(srv.target)
            else:
                self._json(404, {"detail": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if self.path == "/api/v1/devices/enroll":
                self._enroll(body)
                return
            if self.path == "/api/v1/devices/register" and not self._device(body["device_id"]):
                return
            if self.path == "/api/v1/samples" and not self._device(
                body["samples"][0]["device_id"] if body.get("samples") else None
            ):
                return
            if self.path == "/api/v1/devices/register":
                with srv.lock:
                    srv.registrations.append(body)
                self._json(200, {"device_id": body["device_id"]})
            elif self.path == "/api/v1/samples":
                ids = [s["sample_id"] for s in body["samples"]]
                with srv.lock:
                    srv.received_ids.extend(ids)
                    status = srv.sample_statuses.pop(0) if srv.sample_statuses else 200
                    dup = sum(1 for i in ids if i in srv.acked_ids)
                    if 200 <= status < 300:
                        srv.acked_ids.extend(i for i in ids if i not in srv.acked_ids)
                if 200 <= status < 300:
                    self._json(
                        status, {"accepted": len(ids) - dup, "duplicates": dup, "rejected": []}
                    )
                else:
                    self._json(status, {"detail": "try later"})
            else:
                self._json(404, {"detail": "not found"})

        def _enroll(self, body: dict[str, Any]) -> None:
            with srv.lock:
                srv.enrollments.append(body)
                token = body.get("bootstrap_token")
                if token not in srv.bootstrap_tokens:
                    self._json(401, {"detail": "unknown enrollment token"})
                    return
                if srv.one_time_tokens:
                    srv.bootstrap_tokens.discard(token)
                credential = f"cred-{body['device_id']}-{len(srv.enrollments)}"
                srv.credentials[credential] = body["device_id"]
            self._json(201, {"device_id": body["device_id"], "credential": credential})

        def _artifact(self) -> None:
            path, _, query = self.path.partition("?")  # a query: a pre-signed URL's signature
            name = path.removeprefix("/artifacts/")
            data = srv.artifacts.get(name)
            rng = self.headers.get("Range")
            entry: dict[str, Any] = {
                "path": path,
                "query": query,
                "range": rng,
                "status": None,
                "sent": 0,
                "authorization": self.headers.get("Authorization"),
            }
            with srv.lock:
                srv.log.append(entry)
            if data is None:
                entry["status"] = 404
                self._json(404, {"detail": "no artifact"})
                return
            mode = srv.mode
            if mode == "wrong_bytes":
                data = bytes(b ^ 0xFF for b in data)
            start = 0
            m = _RANGE.match(rng or "")
            if m and mode not in ("ignore_range", "oversize"):
                start = int(m.group(1))
            if start >= len(data) and start:
                entry["status"] = 416
                self._json(416, {"detail": "range"})
                return
            body = data[start:]
            status = 206 if start else 200
            entry["status"] = status
            self.send_response(status)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if mode in ("truncate", "oversize"):
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if mode == "truncate":
                    self._write(entry, body[: len(body) // 2])
                elif mode == "drop_once":
                    srv.mode = "normal"
                    self._write(entry, body[: srv.drop_after])
                    self.close_connection = True
                elif mode == "oversize":
                    self._write(entry, body)
                    junk = b"\0" * _CHUNK
                    for _ in range(srv.oversize_extra // _CHUNK):
                        self._write(entry, junk)
                else:
                    self._write(entry, body)
            except (BrokenPipeError, ConnectionResetError):
                entry["aborted"] = True
                self.close_connection = True

        def _write(self, entry: dict[str, Any], data: bytes) -> None:
            bps = srv.throttle_bps
            step = _CHUNK if bps is None else 16 * 1024
            for i in range(0, len(data), step):
                piece = data[i : i + step]
                self.wfile.write(piece)
                self.wfile.flush()
                entry["sent"] += len(piece)
                if bps is not None:
                    time.sleep(len(piece) / bps)

    return Handler


class Rig:
    """An Updater wired to real parts (store, ONNX runtime, HTTP fetcher) with captured reports
    and an injected clock, for exercising the update flow without threads or MQTT."""

    def __init__(self, state_dir: Path, key: Ed25519PrivateKey, **overrides: Any) -> None:
        from device_agent.fetcher import HttpFetcher
        from device_agent.runtime import ModelRuntime
        from device_agent.store import ModelStore
        from device_agent.updater import Updater

        self.key = key
        self.now = time.time()
        self.config = make_config(state_dir, key, **overrides)
        self.store = ModelStore(self.config.state_dir)
        self.runtime = ModelRuntime()
        self.fetcher = HttpFetcher(self.config)
        self.reports: list[Any] = []
        self.updater = Updater(
            self.config,
            store=self.store,
            runtime=self.runtime,
            fetcher=self.fetcher,
            report=self.reports.append,
            clock=lambda: self.now,
        )

    def states(self) -> list[str]:
        return [r.state.value for r in self.reports]

    def serving_version(self) -> int | None:
        cur = self.runtime.current
        return cur.model_version if cur else None

    def close(self) -> None:
        self.fetcher.close()
