"""A small HTTP/1.1 client on the standard library (``http.client``) for the agent's server calls.

The agent makes three kinds of requests: JSON POSTs (registration, sample batches), small GETs
(the target poll) and one streaming GET with ``Range`` (artifact downloads). httpx did all of that
but cost the agent ~7 MB of resident memory (its own modules plus h11, anyio, idna, certifi and a
TLS context loaded with the CA bundle even for plain-http servers); this module costs almost
nothing, since ``http.client`` and ``ssl`` are already imported by paho-mqtt.

- One keep-alive connection per host and thread at a time: idle connections are pooled per
  (scheme, host, port); a request takes one, or opens a fresh one, and returns it once the
  response body has been read to the end. Threads never share a connection.
- ``timeout_s`` bounds the connect and every socket read (seconds).
- TLS only for ``https://`` URLs, with ``ssl.create_default_context()`` (system CA store, host
  name checked), created once on first use.
- Every failure is translated to the agent's family: ``ConnectError`` when no byte of the request
  left this device (the connection could not be opened), ``TransportError`` otherwise.
- ``set_bearer(token, origin)`` adds ``Authorization: Bearer`` to requests for that one origin
  (the edgeloop server) only: artifact URLs may point at mirrors or CDNs, which must never see
  the device's credential.
- A request on a reused connection that the server closed in the meantime (its keep-alive timer
  and our request crossed) is retried once on a fresh connection. Every request the agent makes
  is idempotent on the server (registration is an upsert, samples are deduplicated by id).
"""

from __future__ import annotations

import http.client
import json as _json
import select
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from contract import MessageError
from contract.messages import loads_bounded
from device_agent.config import AGENT_VERSION
from device_agent.errors import ConnectError, TransportError

if TYPE_CHECKING:
    import ssl

MAX_BODY_BYTES = 4 * 1024 * 1024  # bytes, cap on a non-streamed response body (JSON replies)
MAX_LENGTH_DIGITS = 18  # decimal digits of a length header taken at face value (< 2**63)
_IDLE_PER_HOST = 4  # idle keep-alive connections kept per host
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_Key = tuple[str, str, int]


def _origin(url: str) -> _Key:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.scheme, parts.hostname or "", port)


def parse_length(value: str | None) -> int | None:
    """A byte count from a header (Content-Length, a Content-Range part): plain ASCII decimal
    digits, else None. More than ``MAX_LENGTH_DIGITS`` digits reads as 10**18 (over any cap),
    so a hostile header can neither raise nor cost a huge int conversion."""
    if not value or not value.isascii() or not value.isdigit():
        return None
    return int(value) if len(value) <= MAX_LENGTH_DIGITS else 10**MAX_LENGTH_DIGITS


class Response:
    """A complete response: status, headers (case-insensitive ``get``) and the body bytes."""

    def __init__(self, status_code: int, headers: http.client.HTTPMessage, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON, nested at most ``MAX_JSON_DEPTH`` levels (a reply cannot
        make the parser recurse). Raises ValueError if it is not such JSON."""
        try:
            return loads_bounded(self.content, max_bytes=len(self.content), what="response body")
        except MessageError as exc:
            raise ValueError(str(exc)) from exc


class StreamResponse:
    """A response whose body is read on demand with ``iter_bytes`` (see ``HttpClient.stream``)."""

    def __init__(self, url: str, raw: http.client.HTTPResponse) -> None:
        self.url = url
        self.status_code = raw.status
        self.headers = raw.headers
        self._raw = raw

    def iter_bytes(self, chunk_bytes: int) -> Iterator[bytes]:
        """Yield the body in pieces of at most ``chunk_bytes``, as they arrive.

        Raises:
            TransportError: the connection failed or closed before the declared length.
        """
        while True:
            try:
                chunk = self._raw.read1(chunk_bytes)
            except (OSError, http.client.HTTPException) as exc:
                raise TransportError(f"GET {self.url}: {type(exc).__name__}: {exc}") from exc
            if not chunk:
                if self._raw.length == 0:
                    self._raw.read()  # marks the body complete, so the connection is reused
                return
            yield chunk

    def read_at_most(self, limit: int) -> bytes:
        """Read the body, stopping after ``limit`` + 1 bytes: a result longer than ``limit``
        means the body was too long (the rest is never read; leaving the ``stream`` block then
        closes the connection).

        Raises:
            TransportError: the connection failed.
        """
        parts: list[bytes] = []
        got = 0
        for chunk in self.iter_bytes(min(64 * 1024, limit + 1)):
            parts.append(chunk)
            got += len(chunk)
            if got > limit:
                break
        return b"".join(parts)[: limit + 1]


class HttpClient:
    """Thread-safe keep-alive HTTP client. ``close`` drops every pooled connection.

    Args:
        timeout_s: seconds allowed for connecting and for each socket read.
        max_body_bytes: cap on a response body read by ``get``/``post`` (streams are bounded
            by their caller).
    """

    def __init__(self, *, timeout_s: float, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._headers = {"User-Agent": f"edgeloop-agent/{AGENT_VERSION}"}
        self._bearer: tuple[_Key, str] | None = None  # (server origin, token)

    def set_bearer(self, token: str, *, origin: str) -> None:
        """Send ``token`` as the bearer credential on every request to ``origin`` (a base URL)."""
        self._bearer = (_origin(origin), token)

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # ---- requests ------------------------------------------------------------------------------
    def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> Response:
        """GET ``url`` and read the whole body.

        Raises:
            ConnectError: the connection could not be opened.
            TransportError: any later failure, or a body over ``max_body_bytes``.
        """
        return self.request("GET", url, headers=headers)

    def post(self, url: str, *, json: Any, headers: Mapping[str, str] | None = None) -> Response:
        """POST ``json`` (serialised compactly as UTF-8) and read the whole reply.

        Raises:
            ConnectError: the connection could not be opened.
            TransportError: any later failure, or a body over ``max_body_bytes``.
        """
        body = _json.dumps(json, separators=(",", ":")).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", url, body=body, headers=hdrs)

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request and read the whole response (see ``get``/``post``)."""
        key, conn, raw = self._send(method, url, body, headers)
        try:
            content = raw.read(self.max_body_bytes + 1)
            if len(content) > self.max_body_bytes:
                raise TransportError(
                    f"{method} {url}: response body exceeds {self.max_body_bytes} bytes"
                )
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransportError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        except TransportError:
            conn.close()
            raise
        self._finish(key, conn, raw)
        return Response(raw.status, raw.headers, content)

    @contextmanager
    def stream(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None
    ) -> Iterator[StreamResponse]:
        """Send a request and yield the response before its body is read.

        A body left unread when the block exits closes the connection, so a caller that stops
        early (endless data) never downloads the rest.

        Raises:
            ConnectError: the connection could not be opened.
            TransportError: any later failure.
        """
        key, conn, raw = self._send(method, url, None, headers)
        try:
            yield StreamResponse(url, raw)
        except BaseException:
            conn.close()
            raise
        if raw.isclosed():
            self._finish(key, conn, raw)
        else:
            conn.close()

    # ---- connections -----------------------------------------------------------------------
    def _send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> tuple[_Key, http.client.HTTPConnection, http.client.HTTPResponse]:
        try:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise TransportError(f"{method} {url[:200]}: not an http(s) URL")
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:  # bad IPv6 literal, port out of range
            raise TransportError(f"{method} {url[:200]}: {exc}") from exc
        key: _Key = (parts.scheme, parts.hostname, port)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        hdrs = {**self._headers, **(headers or {})}
        if self._bearer is not None and self._bearer[0] == key:
            hdrs.setdefault("Authorization", f"Bearer {self._bearer[1]}")
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return key, conn, self._exchange(conn, method, target, body, hdrs)
            except _STALE:
                conn.close()  # the server closed it while idle: one retry on a fresh one
            except (OSError, ValueError, http.client.HTTPException) as exc:
                conn.close()
                raise TransportError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        try:
            conn = self._connect(key)
        except (ValueError, http.client.HTTPException) as exc:  # a host http.client refuses
            raise ConnectError(f"{method} {url[:200]}: {type(exc).__name__}: {exc}") from exc
        try:
            conn.connect()
        except (OSError, ValueError) as exc:  # ValueError: a host name IDNA cannot encode
            conn.close()
            raise ConnectError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        try:
            return key, conn, self._exchange(conn, method, target, body, hdrs)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            conn.close()
            raise TransportError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _exchange(
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> http.client.HTTPResponse:
        conn.request(method, target, body=body, headers=headers)
        return conn.getresponse()

    def _connect(self, key: _Key) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self.timeout_s, context=self._tls_context()
            )
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            import ssl

            self._tls = ssl.create_default_context()
        return self._tls

    def _take_idle(self, key: _Key) -> http.client.HTTPConnection | None:
        """An idle connection to ``key`` the server has not closed, or None."""
        while True:
            with self._lock:
                conns = self._idle.get(key)
                if not conns:
                    return None
                conn = conns.pop()
            if _still_open(conn):
                return conn
            conn.close()

    def _finish(
        self, key: _Key, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse
    ) -> None:
        """Pool ``conn`` if its response was read to the end and the server keeps it open."""
        if raw.will_close or not raw.isclosed():
            conn.close()
            return
        with self._lock:
            conns = self._idle.setdefault(key, [])
            if len(conns) < _IDLE_PER_HOST:
                conns.append(conn)
                return
        conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """False if the server closed an idle connection (its socket reads EOF or holds junk)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable  # an idle HTTP/1.1 connection has nothing to read unless it closed


__all__ = ["MAX_BODY_BYTES", "HttpClient", "Response", "StreamResponse", "parse_length"]
