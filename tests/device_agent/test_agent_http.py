"""The agent's standard-library HTTP client against a real local server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from device_agent.errors import ConnectError, TransportError
from device_agent.http import HttpClient


class _Server:
    def __init__(self) -> None:
        self.peers: list[int] = []  # client port of every request: one per connection used
        self.close_after = False  # close the socket after replying, without saying so
        self.body = b'{"ok": true}'
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _reply(self) -> None:
                srv.peers.append(self.client_address[1])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(srv.body)))
                self.end_headers()
                self.wfile.write(srv.body)
                if srv.close_after:
                    self.close_connection = True

            def do_GET(self) -> None:
                self._reply()

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                srv.body = self.rfile.read(n)  # echo the request body
                self._reply()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_keep_alive_reuses_one_connection(server: _Server) -> None:
    with HttpClient(timeout_s=5) as client:
        for _ in range(3):
            resp = client.get(server.url + "/x")
            assert resp.is_success and resp.json() == {"ok": True}
    assert len(server.peers) == 3 and len(set(server.peers)) == 1


def test_post_sends_json(server: _Server) -> None:
    with HttpClient(timeout_s=5) as client:
        resp = client.post(server.url + "/echo", json={"a": [1, 2]})
    assert json.loads(resp.content) == {"a": [1, 2]}


def test_connection_closed_by_server_while_idle_is_replaced(server: _Server) -> None:
    server.close_after = True
    with HttpClient(timeout_s=5) as client:
        for _ in range(3):
            assert client.get(server.url + "/x").status_code == 200
    assert len(set(server.peers)) == 3  # a fresh connection each time, no failed request


def test_refused_connection_is_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with HttpClient(timeout_s=2) as client, pytest.raises(ConnectError):
            client.get(f"http://127.0.0.1:{port}/x")


def test_body_over_the_cap_is_transport_error(server: _Server) -> None:
    server.body = b"x" * 5000
    client = HttpClient(timeout_s=5, max_body_bytes=4096)
    with client, pytest.raises(TransportError, match="exceeds"):
        client.get(server.url + "/big")


def test_not_http_url_is_transport_error() -> None:
    with HttpClient(timeout_s=1) as client, pytest.raises(TransportError):
        client.get("ftp://example.invalid/x")
