"""The simulator's process helpers: a real server process started on a port someone took."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from firmware_sim import services
from firmware_sim.services import ServerProcess


def test_a_server_whose_picked_port_was_taken_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between picking a free port and the server binding it, another process may take it (any
    outgoing connection may get it as its local port): the server then starts on a new one."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_free_port = services.free_port
        monkeypatch.setattr(services, "free_port", lambda: next(picks, None) or real_free_port())
        env = {"EDGELOOP_ENABLE_MQTT": "false", "EDGELOOP_ENABLE_JOB_RUNNER": "false"}
        server = ServerProcess(tmp_path / "srv", mqtt_port=1, env=env)
        assert server.port == taken
        try:
            server.start()
            assert server.port != taken and server.url.endswith(f":{server.port}")
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
            assert b"address already in use" in server.log_path.read_bytes()
        finally:
            server.stop()


def test_a_port_the_caller_chose_is_kept(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        env = {"EDGELOOP_ENABLE_MQTT": "false", "EDGELOOP_ENABLE_JOB_RUNNER": "false"}
        server = ServerProcess(tmp_path / "srv", mqtt_port=1, env=env, port=taken)
        try:
            with pytest.raises(RuntimeError, match="server exited"):
                server.start()
            assert server.port == taken
        finally:
            server.stop()
