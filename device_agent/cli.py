"""``edgeloop-agent``: run the agent with a tiny local HTTP API, or check the installed model.

    edgeloop-agent run --config agent.json [--listen 127.0.0.1:0]
    edgeloop-agent check --config agent.json
    edgeloop-agent status --config agent.json
    edgeloop-agent install --config agent.json DIR   # an exported bundle, offline

``run`` prints exactly one line, ``edgeloop-agent listening on http://HOST:PORT``, to stdout once
the local API listens, logs JSON lines to stderr, and exits cleanly on SIGTERM/SIGINT.
Local API: ``POST /predict {"input": [floats]}``, ``POST /feedback {"prediction_id",
"true_label"}``, ``GET /status``, ``GET /healthz`` (200 while a verified model serves and every
worker runs, else 503).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.errors import (
    AgentError,
    InferenceError,
    NoModelError,
    UnknownPredictionError,
)
from device_agent.offline import install_bundle

MAX_BODY_BYTES = 4 * 1024 * 1024  # bytes accepted in one local API request
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and k not in out and k != "message":
                out[k] = v if isinstance(v, str | int | float | bool | None) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def make_handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``agent`` (no module-level state)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            logging.getLogger("device_agent.http").debug(format % args)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any] | None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._send(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
                return None
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {"error": "body is not JSON"})
                return None
            if not isinstance(data, dict):
                self._send(400, {"error": "body must be a JSON object"})
                return None
            return data

        def do_GET(self) -> None:
            if self.path == "/status":
                self._send(200, agent.status())
            elif self.path == "/healthz":  # 200 while a model serves and no worker is down
                st = agent.status()
                down = sorted(n for n, w in st["workers"].items() if w["state"] == "down")
                ok = bool(st["serving"]) and not down
                self._send(
                    200 if ok else 503,
                    {
                        "ok": ok,
                        "model_version": st["model_version"],
                        "state": st["state"],
                        "workers_down": down,
                    },
                )
            else:
                self._send(404, {"error": f"no route GET {self.path}"})

        def do_POST(self) -> None:
            if self.path not in ("/predict", "/feedback"):
                self._send(404, {"error": f"no route POST {self.path}"})
                return
            data = self._body()
            if data is None:
                return
            if self.path == "/predict":
                self._predict(data)
            else:
                self._feedback(data)

        def _predict(self, data: dict[str, Any]) -> None:
            values = data.get("input")
            if not isinstance(values, list):
                self._send(400, {"error": "input must be a list of numbers"})
                return
            try:
                p = agent.predict(np.asarray(values, dtype=np.float32))
            except NoModelError as exc:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
                return
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": str(exc)})
                return
            except InferenceError as exc:
                self._send(500, {"error": str(exc)})
                return
            self._send(
                200,
                {
                    "prediction_id": p.prediction_id,
                    "label": p.label,
                    "confidence": p.confidence,
                    "model_version": p.model_version,
                    "latency_ms": p.latency_ms,
                },
            )

        def _feedback(self, data: dict[str, Any]) -> None:
            pid, label = data.get("prediction_id"), data.get("true_label")
            if not isinstance(pid, str) or not isinstance(label, int) or isinstance(label, bool):
                self._send(400, {"error": "need prediction_id (string) and true_label (int)"})
                return
            try:
                captured = agent.feedback(pid, label)
            except UnknownPredictionError as exc:
                self._send(404, {"error": str(exc)})
                return
            self._send(200, {"captured": captured})

    return Handler


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("--listen must be HOST:PORT")
    return host, int(port)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    agent = Agent(config)
    host, port = args.listen
    server = ThreadingHTTPServer((host, port), make_handler(agent))  # bind first: fail fast
    server.daemon_threads = True
    agent.start()
    serve = threading.Thread(target=server.serve_forever, name="agent-http", daemon=True)
    serve.start()
    print(f"edgeloop-agent listening on http://{host}:{server.server_address[1]}", flush=True)
    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        logging.getLogger(__name__).info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not done.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    agent.stop()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    agent = Agent(config)
    ok = False
    try:
        if agent.resume() and agent.manifest is not None:
            agent.predict(np.zeros(agent.manifest.input_spec.features, dtype=np.float32))
            ok = True
    except AgentError as exc:
        logging.getLogger(__name__).error("check failed: %s", exc)
    finally:
        status = agent.status()
        agent.stop()
    print(json.dumps({"ok": ok, **status}, indent=2), flush=True)
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Print the persisted state (slots, update job, refused versions, spool) without running."""
    from device_agent.capture import Spool
    from device_agent.store import ModelStore

    config = load_config(args.config)
    st = ModelStore(config.state_dir).load_state()
    spool = Spool(
        config.state_dir / "spool", batch_max=config.upload_batch_max, max_bytes=1 << 62
    ).stats()
    out = {
        "device_id": config.device_id,
        "state_dir": str(config.state_dir),
        "current": None if st.current is None else vars(st.current) | {"envelope": "..."},
        "previous": None if st.previous is None else vars(st.previous) | {"envelope": "..."},
        "highest_release": st.highest_release,
        "update": None if st.update is None else st.update.to_dict() | {"target": "..."},
        "refused": [vars(r) for r in st.refused],
        "spool": vars(spool),
    }
    print(json.dumps(out, indent=2, default=str), flush=True)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Install an exported release bundle offline (device_agent.offline); exit 0 when it
    installed, 1 when refused or failed. Prints one JSON object saying which."""
    config = load_config(args.config)
    result = install_bundle(config, args.directory)
    print(json.dumps(result.to_dict(), indent=2), flush=True)
    if not result.ok:
        logging.getLogger(__name__).error("install refused: %s", result.reason)
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeloop-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent and its local HTTP API")
    run.add_argument("--config", required=True)
    run.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 0))
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="verify and load the installed model, run one inference")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="print the persisted update state (no network)")
    status.add_argument("--config", required=True)
    status.set_defaults(func=cmd_status)
    install = sub.add_parser(
        "install", help="verify and install an exported release bundle (no server, no broker)"
    )
    install.add_argument("--config", required=True)
    install.add_argument("directory", type=Path, help="written by `edgeloop releases export`")
    install.set_defaults(func=cmd_install)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except AgentError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
