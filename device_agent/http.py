"""The agent's HTTP client: urllib3 underneath, the agent's limits and error family on top.

The agent makes three kinds of requests: JSON POSTs (registration, sample batches), small GETs
(the target poll) and one streaming GET with ``Range`` (artifact downloads). urllib3 does the
protocol work: keep-alive pools (one connection per request at a time, ``IDLE_PER_HOST`` kept
idle per host), TLS, proxies, timeouts. It costs the agent ~1.3 MB of resident memory; httpx
(which the agent used first) cost ~7 MB, pydantic-free as the agent is.

What devices meet in the field:

- Proxies from the environment, as curl and requests read them: ``HTTPS_PROXY`` /
  ``HTTP_PROXY`` / ``ALL_PROXY`` (lower case wins), and ``NO_PROXY`` for the hosts reached
  directly (``urllib.request.getproxies`` / ``proxy_bypass_environment``). An https URL goes
  through the proxy in a CONNECT tunnel (the proxy sees the host name, never the bytes); a
  proxy URL's ``user:password`` is sent as ``Proxy-Authorization``.
- A custom CA bundle (``ca_bundle``, a PEM file): it replaces the system's CA store for every
  https connection (a private PKI need not trust public CAs). Host names are always checked.
- Redirects (301, 302, 303, 307, 308) on GET, to a mirror, a CDN or a pre-signed URL, at most
  ``max_redirects`` per request. Each hop picks its own proxy; ``Range`` and the other request
  headers follow, the bearer credential does not (see below). ``https_redirects_only`` (set in
  production) refuses a redirect to a non-https URL. Following a redirect changes where bytes
  come from, never what is accepted: the fetcher bounds them by the signed size while
  streaming and the updater checks the signed sha256 before anything is installed.

Errors are translated to the agent's family: ``ConnectError`` when no byte of the request left
this device (no connection, no tunnel, a TLS handshake refused), ``RedirectError`` for a refused
redirect, ``TransportError`` for everything else. ``set_bearer(token, origin)`` adds
``Authorization: Bearer`` to requests for that one origin (the edgeloop server) only: artifact
URLs may point at mirrors or CDNs, which must never see the device's credential. A request on a
reused connection that the server closed in the meantime (its keep-alive timer and our request
crossed) is retried once on a fresh connection: every request the agent makes is idempotent on
the server (registration is an upsert, samples are deduplicated by id).
"""

from __future__ import annotations

import http.client
import json as _json
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    SSLError,
)

from contract import MessageError
from contract.messages import loads_bounded
from device_agent.config import AGENT_VERSION
from device_agent.errors import ConnectError, RedirectError, TransportError

if TYPE_CHECKING:
    import ssl

    from device_agent.config import AgentConfig

MAX_BODY_BYTES = 4 * 1024 * 1024  # bytes, cap on a non-streamed response body (JSON replies)
MAX_LENGTH_DIGITS = 18  # decimal digits of a length header taken at face value (< 2**63)
IDLE_PER_HOST = 4  # idle keep-alive connections kept per host
MAX_POOLS = 8  # hosts (server, mirrors, CDNs) whose idle connections are kept
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_NOT_SENT = (NewConnectionError, ConnectTimeoutError, ProxyError, SSLError)
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

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
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
    """A response whose body is read on demand with ``iter_bytes`` (see ``HttpClient.stream``).

    ``url`` is where the body comes from: the last URL of a redirect chain.
    """

    def __init__(self, url: str, raw: urllib3.BaseHTTPResponse) -> None:
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
            except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
                raise TransportError(f"GET {self.url}: {_describe(exc)}") from exc
            if not chunk:
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
        ca_bundle: PEM file of the CAs trusted for https (None: the system's store).
        max_redirects: redirects one GET follows (0: none; the 3xx is returned).
        https_redirects_only: refuse a redirect to a URL that is not https (production).
        proxies: scheme -> proxy URL plus ``"no"`` -> bypass list, as ``getproxies`` returns;
            None reads them from the environment once, here.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        max_body_bytes: int = MAX_BODY_BYTES,
        ca_bundle: str | Path | None = None,
        max_redirects: int = 5,
        https_redirects_only: bool = False,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.ca_bundle = ca_bundle
        self.max_redirects = max_redirects
        self.https_redirects_only = https_redirects_only
        self.proxies = dict(getproxies() if proxies is None else proxies)
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self._managers: dict[tuple[str | None, bool], urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._headers = {"User-Agent": f"edgeloop-agent/{AGENT_VERSION}"}
        self._bearer: tuple[_Key, str] | None = None  # (server origin, token)

    @classmethod
    def from_config(cls, config: AgentConfig) -> HttpClient:
        """The client an agent with ``config`` uses (timeouts, CA bundle, redirect policy)."""
        return cls(
            timeout_s=config.http_timeout_s,
            ca_bundle=config.ca_bundle,
            max_redirects=config.max_redirects,
            https_redirects_only=config.environment == "production",
        )

    def set_bearer(self, token: str, *, origin: str) -> None:
        """Send ``token`` as the bearer credential on every request to ``origin`` (a base URL)."""
        self._bearer = (_origin(origin), token)

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            managers, self._managers = self._managers, {}
        for manager in managers.values():
            manager.clear()

    # ---- requests ------------------------------------------------------------------------------
    def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> Response:
        """GET ``url`` (following redirects) and read the whole body.

        Raises:
            ConnectError: the connection could not be opened.
            RedirectError: a redirect was refused.
            TransportError: any later failure, or a body over ``max_body_bytes``.
        """
        return self.request("GET", url, headers=headers)

    def post(self, url: str, *, json: Any, headers: Mapping[str, str] | None = None) -> Response:
        """POST ``json`` (serialised compactly as UTF-8) and read the whole reply. A redirect is
        returned as it is, not followed.

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
        url, raw = self._open(method, url, body, headers)
        try:
            content = raw.read(self.max_body_bytes + 1, decode_content=False)
            if len(content) > self.max_body_bytes:
                raise TransportError(
                    f"{method} {url}: response body exceeds {self.max_body_bytes} bytes"
                )
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            _discard(raw)
            raise TransportError(f"{method} {url}: {_describe(exc)}") from exc
        except TransportError:
            _discard(raw)
            raise
        _finish(raw)
        return Response(raw.status, raw.headers, content)

    @contextmanager
    def stream(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None
    ) -> Iterator[StreamResponse]:
        """Send a request (following redirects if a GET) and yield the response before its
        body is read.

        A body left unread when the block exits closes the connection, so a caller that stops
        early (endless data) never downloads the rest.

        Raises:
            ConnectError: the connection could not be opened.
            RedirectError: a redirect was refused.
            TransportError: any later failure.
        """
        url, raw = self._open(method, url, None, headers)
        try:
            yield StreamResponse(url, raw)
        except BaseException:
            _discard(raw)
            raise
        _finish(raw)

    # ---- redirects, proxies, connections ------------------------------------------------------
    def _open(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> tuple[str, urllib3.BaseHTTPResponse]:
        """Send the request, following redirects of a GET; returns the final URL and response."""
        follow = self.max_redirects if method in ("GET", "HEAD") else 0
        for hop in range(follow + 1):
            raw = self._send(method, url, body, headers)
            location = raw.headers.get("Location")
            if not follow or raw.status not in REDIRECT_STATUSES or not location:
                return url, raw
            _discard(raw)  # a redirect's body is never read
            if hop == follow:
                break
            url = self._redirect_target(method, url, location)
        raise RedirectError(f"{method} {url[:200]}: more than {follow} redirects")

    def _redirect_target(self, method: str, url: str, location: str) -> str:
        try:
            target = urljoin(url, location.strip())
            scheme = urlsplit(target).scheme
        except ValueError as exc:
            raise RedirectError(f"{method} {url[:200]}: bad redirect {location[:200]!r}") from exc
        if scheme not in ("http", "https"):
            raise RedirectError(f"{method} {url[:200]}: redirect to {target[:200]!r} refused")
        if scheme != "https" and self.https_redirects_only:
            raise RedirectError(
                f"{method} {url[:200]}: redirect to non-https {target[:200]!r} refused "
                "(environment is production)"
            )
        return target

    def _send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> urllib3.BaseHTTPResponse:
        try:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise TransportError(f"{method} {url[:200]}: not an http(s) URL")
            key: _Key = (parts.scheme, parts.hostname, parts.port or _default_port(parts.scheme))
        except ValueError as exc:  # bad IPv6 literal, port out of range
            raise TransportError(f"{method} {url[:200]}: {exc}") from exc
        hdrs = {**self._headers, **(headers or {})}
        if self._bearer is not None and self._bearer[0] == key:
            hdrs.setdefault("Authorization", f"Bearer {self._bearer[1]}")
        manager = self._manager(key)
        for attempt in range(2):
            try:
                return manager.urlopen(
                    method,
                    url,
                    body=body,
                    headers=hdrs,
                    redirect=False,  # followed by _open, which applies the policy per hop
                    retries=False,  # errors are raised as they are, translated below
                    preload_content=False,
                    decode_content=False,
                    timeout=self._timeout,
                )
            except ProtocolError as exc:
                stale = any(isinstance(a, _STALE) for a in exc.args)
                if stale and attempt == 0:
                    continue  # the server closed a pooled connection: one fresh attempt
                raise TransportError(f"{method} {url}: {_describe(exc)}") from exc
            except _NOT_SENT as exc:
                if attempt:  # the first attempt may have reached the server
                    raise TransportError(f"{method} {url}: {_describe(exc)}") from exc
                raise ConnectError(f"{method} {url[:200]}: {_describe(exc)}") from exc
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                raise TransportError(f"{method} {url[:200]}: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _manager(self, key: _Key) -> urllib3.PoolManager:
        """The pool manager for ``key``'s scheme and proxy (created on first use)."""
        scheme, host, port = key
        proxy = self._proxy_for(scheme, host, port)
        tls = scheme == "https" or (proxy or "").startswith("https:")
        with self._lock:
            manager = self._managers.get((proxy, tls))
            if manager is not None:
                return manager
        kw: dict[str, Any] = {"num_pools": MAX_POOLS, "maxsize": IDLE_PER_HOST, "block": False}
        if tls:
            kw["ssl_context"] = self._tls_context(key)
        if proxy is None:
            manager = urllib3.PoolManager(**kw)
        else:
            proxy_parts = urlsplit(proxy)
            if proxy_parts.username is not None:
                auth = f"{unquote(proxy_parts.username)}:{unquote(proxy_parts.password or '')}"
                kw["proxy_headers"] = urllib3.make_headers(proxy_basic_auth=auth)
            if proxy_parts.scheme == "https":
                kw["proxy_ssl_context"] = kw["ssl_context"]
            try:
                manager = urllib3.ProxyManager(proxy, **kw)
            except (urllib3.exceptions.HTTPError, ValueError) as exc:
                raise ConnectError(f"proxy {_redact(proxy)}: {_describe(exc)}") from exc
        with self._lock:
            return self._managers.setdefault((proxy, tls), manager)

    def _proxy_for(self, scheme: str, host: str, port: int) -> str | None:
        """The proxy URL for a request to ``scheme://host:port``, or None to go direct."""
        proxy = self.proxies.get(scheme) or self.proxies.get("all")
        # urllib.request's NO_PROXY matcher (undocumented, stable since 3.0; requests uses it).
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if not proxy or bypass(f"{host}:{port}", self.proxies):
            return None
        return proxy if "://" in proxy else f"http://{proxy}"

    def _tls_context(self, key: _Key) -> ssl.SSLContext:
        if self._tls is None:
            import ssl

            try:
                self._tls = ssl.create_default_context(
                    cafile=None if self.ca_bundle is None else str(self.ca_bundle)
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConnectError(
                    f"{key[0]}://{key[1]}:{key[2]}: CA bundle {self.ca_bundle}: {exc}"
                ) from exc
        return self._tls


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _finish(raw: urllib3.BaseHTTPResponse) -> None:
    """Hand the connection back: to the pool if the body was read to its end, else closed."""
    if raw.closed:
        raw.release_conn()  # urllib3 pools it unless the server said Connection: close
    else:
        _discard(raw)


def _discard(raw: urllib3.BaseHTTPResponse) -> None:
    """Close a response whose body will not be read (its connection is not reused)."""
    raw.close()
    raw.release_conn()


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the error, reaching through urllib3's wrappers to the cause."""
    inner: BaseException = exc
    reason = getattr(exc, "reason", None) or getattr(exc, "original_error", None)
    if isinstance(reason, BaseException):
        inner = reason
    return f"{type(exc).__name__}: {inner}" if inner is exc else f"{type(exc).__name__}: {inner!r}"


def _redact(url: str) -> str:
    """``url`` without the password of its userinfo (proxy URLs carry credentials)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


__all__ = [
    "IDLE_PER_HOST",
    "MAX_BODY_BYTES",
    "HttpClient",
    "Response",
    "StreamResponse",
    "parse_length",
]
