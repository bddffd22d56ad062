"""What a device meets between it and the server, for tests: a real HTTP proxy (CONNECT tunnels
and absolute-form forwarding) in a thread, and a private CA with a server certificate for
127.0.0.1 (``tls_files``), to serve https that only a custom CA bundle trusts.
"""

from __future__ import annotations

import http.client
import select
import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from firmware_sim.pki import Pki

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


@dataclass
class ProxyRequest:
    method: str
    target: str  # "host:port" for CONNECT, the absolute URL when forwarding
    headers: dict[str, str]  # lower-case names


@dataclass
class Proxy:
    """An HTTP proxy on 127.0.0.1: ``CONNECT host:port`` opens a tunnel (https through the
    proxy: it relays bytes it cannot read); ``GET http://...`` is forwarded, one request per
    connection. Every request is logged. With ``credentials`` ("user:password"), a request
    without that ``Proxy-Authorization: Basic`` gets 407."""

    credentials: str | None = None
    log: list[ProxyRequest] = field(default_factory=list)

    def start(self) -> Proxy:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._handle(self)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handle(self, h: socketserver.StreamRequestHandler) -> None:
        line = h.rfile.readline(65537).decode("latin-1").split()
        if len(line) != 3:
            return
        method, target, _ = line
        headers: dict[str, str] = {}
        while (raw := h.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self.log.append(ProxyRequest(method, target, headers))
        if self.credentials is not None:
            import base64

            want = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if headers.get("proxy-authorization") != want:
                h.wfile.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
                h.wfile.write(b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n")
                return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                h.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                h.wfile.flush()
                _relay(h.connection, upstream)
            return
        self._forward(h, method, target, headers)

    @staticmethod
    def _forward(
        h: socketserver.StreamRequestHandler, method: str, target: str, headers: dict[str, str]
    ) -> None:
        url = urlsplit(target)
        body = h.rfile.read(int(headers.get("content-length") or 0)) or None
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=10)
        try:
            path = url.path + (f"?{url.query}" if url.query else "")
            sent = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
            conn.request(method, path or "/", body=body, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        out = [f"HTTP/1.1 {resp.status} {resp.reason}"]
        out += [
            f"{k}: {v}"
            for k, v in resp.getheaders()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
        ]
        out += [f"Content-Length: {len(data)}", "Connection: close", "", ""]
        h.wfile.write("\r\n".join(out).encode("latin-1") + data)


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    while True:
        readable, _, _ = select.select([a, b], [], [], 30)
        if not readable:
            return
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                return
            if not data:
                return
            (b if s is a else a).sendall(data)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate (PEM): what a client's ca_bundle names
    cert: Path  # the server certificate for 127.0.0.1 and localhost, signed by the CA
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate it signed (for 127.0.0.1 and localhost),
    written under ``directory`` by the simulator's PKI (``firmware_sim.pki``)."""
    pki = Pki.create(directory, "https")
    cert, key = pki.issue("127.0.0.1", dns=("localhost",), ips=("127.0.0.1",))
    return TlsFiles(pki.ca_file, cert, key)


def redirect(to: str, status: int = 302) -> bytes:
    """A whole raw response (for ``FakeServer.raw_responses``) redirecting to ``to``."""
    reason = {301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect"}.get(status, "")
    return (
        f"HTTP/1.1 {status} {reason}\r\nLocation: {to}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


__all__: list[Any] = ["Proxy", "ProxyRequest", "TlsFiles", "redirect", "tls_files"]
