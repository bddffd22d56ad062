"""What devices meet in the field, against real servers started by the tests: an HTTP proxy
named by the environment (CONNECT tunnels for https, forwarding for http, NO_PROXY, proxy
credentials), a private CA named by ``ca_bundle``, and redirects to a CDN or a signed URL (the
credential stays with the server; production refuses a redirect to plain http)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from device_agent.errors import ConnectError, RedirectError
from device_agent.fetcher import HttpFetcher
from device_agent.http import HttpClient
from device_agent.verify import verify_artifact
from tests.device_agent.agent_testkit import (
    FakeServer,
    device_http,
    make_config,
    make_manifest,
    make_model,
)
from tests.device_agent.netkit import Proxy, TlsFiles, redirect, tls_files

DATA = make_model(5) * 30  # ~75 KiB: several chunks at the test chunk size
REF = make_manifest(DATA, release=1, model_version=1).artifact
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the proxy variables it means; none leak in from the machine."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def tls(tmp_path) -> TlsFiles:
    return tls_files(tmp_path / "tls")


@pytest.fixture
def https_server(tls: TlsFiles) -> Iterator[FakeServer]:
    srv = FakeServer(tls=tls.server_context()).start()
    yield srv
    srv.stop()


@pytest.fixture
def cdn() -> Iterator[FakeServer]:
    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy().start()
    yield p
    p.stop()


def fetch(tmp_path, signing_key, url: str, **config) -> None:  # noqa: ANN003
    """Download ``url`` the way the agent does (HttpFetcher from an AgentConfig), and check
    the bytes against the signed size and hash."""
    cfg = make_config(tmp_path / "state", signing_key, download_chunk_bytes=4096, **config)
    fetcher = HttpFetcher(cfg)
    dest = tmp_path / f"{REF.sha256}.part"
    try:
        fetcher.fetch(url, dest, expected_size=REF.size)
    finally:
        fetcher.close()
    verify_artifact(dest, REF)


# ---- custom CA bundle ---------------------------------------------------------------------------
def test_https_is_trusted_only_with_the_ca_bundle_that_signed_the_server(
    https_server: FakeServer, tls: TlsFiles
) -> None:
    url = https_server.add("a.onnx", DATA)
    with HttpClient(timeout_s=5) as client, pytest.raises(ConnectError, match="CERTIFICATE"):
        client.get(url)  # the system's CA store does not know the test CA
    assert https_server.requests_for("a.onnx") == []  # nothing reached the server
    with HttpClient(timeout_s=5, ca_bundle=tls.ca) as client:
        assert client.get(url).content == DATA


# ---- proxies from the environment --------------------------------------------------------------
def test_https_download_through_a_real_proxy_named_by_https_proxy(
    monkeypatch, tmp_path, signing_key, https_server: FakeServer, tls: TlsFiles, proxy: Proxy
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    url = https_server.add("a.onnx", DATA)
    fetch(tmp_path, signing_key, url, ca_bundle=tls.ca)
    port = https_server.httpd.server_address[1]
    # A tunnel: the proxy saw where to, never the request (nor a credential) inside it.
    assert [(r.method, r.target) for r in proxy.log] == [("CONNECT", f"127.0.0.1:{port}")]
    assert "authorization" not in proxy.log[0].headers
    assert [e["status"] for e in https_server.requests_for("a.onnx")] == [200]


def test_http_download_is_forwarded_by_the_proxy_named_by_http_proxy(
    monkeypatch, tmp_path, signing_key, fake_server: FakeServer, proxy: Proxy
) -> None:
    monkeypatch.setenv("http_proxy", proxy.url)
    url = fake_server.add("a.onnx", DATA)
    fetch(tmp_path, signing_key, url)
    assert [(r.method, r.target) for r in proxy.log] == [("GET", url)]
    assert len(fake_server.requests_for("a.onnx")) == 1


def test_no_proxy_hosts_are_reached_directly(
    monkeypatch, tmp_path, signing_key, fake_server: FakeServer, proxy: Proxy
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    fetch(tmp_path, signing_key, fake_server.add("a.onnx", DATA))
    assert proxy.log == []
    assert len(fake_server.requests_for("a.onnx")) == 1


def test_proxy_credentials_from_the_proxy_url(monkeypatch, fake_server: FakeServer) -> None:
    guarded = Proxy(credentials="dev-1:s3cret").start()
    try:
        port = guarded.server.server_address[1]
        url = fake_server.add("a.onnx", DATA)
        monkeypatch.setenv("HTTP_PROXY", f"http://dev-1:s3cret@127.0.0.1:{port}")
        with HttpClient(timeout_s=5) as client:
            assert client.get(url).content == DATA
        monkeypatch.setenv("HTTP_PROXY", f"http://dev-1:wrong@127.0.0.1:{port}")
        with HttpClient(timeout_s=5) as client:
            assert client.get(url).status_code == 407  # the proxy's answer, as it gave it
    finally:
        guarded.stop()
    assert len(fake_server.requests_for("a.onnx")) == 1


def test_a_proxy_that_does_not_answer_is_a_connect_error(monkeypatch, https_server, tls) -> None:
    from firmware_sim.services import free_port

    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    with HttpClient(timeout_s=5, ca_bundle=tls.ca) as client, pytest.raises(ConnectError):
        client.get(https_server.add("a.onnx", DATA))


# ---- redirects ----------------------------------------------------------------------------------
def test_redirect_to_a_cdn_carries_range_but_not_the_credential(
    fake_server: FakeServer, cdn: FakeServer
) -> None:
    target = cdn.add("m.onnx", DATA)
    fake_server.raw_responses["/artifacts/m.onnx"] = redirect(target)
    client = device_http(fake_server)  # sends its bearer credential to fake_server only
    url = f"{fake_server.url}/artifacts/m.onnx"
    with client, client.stream("GET", url, headers={"Range": "bytes=100-"}) as resp:
        assert resp.status_code == 206 and resp.url == target
        body = resp.read_at_most(len(DATA))
    assert body == DATA[100:]
    assert fake_server.requests_for("m.onnx")[0]["range"] == "bytes=100-"
    (at_cdn,) = cdn.requests_for("m.onnx")
    assert at_cdn["range"] == "bytes=100-" and at_cdn["authorization"] is None


def test_production_refuses_a_redirect_to_plain_http(
    fake_server: FakeServer, cdn: FakeServer
) -> None:
    fake_server.raw_responses["/artifacts/m.onnx"] = redirect(cdn.add("m.onnx", DATA))
    url = f"{fake_server.url}/artifacts/m.onnx"
    client = HttpClient(timeout_s=5, https_redirects_only=True)
    with client, pytest.raises(RedirectError, match="non-https"):
        client.get(url)
    assert cdn.requests_for("m.onnx") == []  # never contacted
    with HttpClient(timeout_s=5) as client:  # development follows it
        assert client.get(url).content == DATA


def test_production_follows_a_redirect_to_https(tls: TlsFiles) -> None:
    origin = FakeServer(tls=tls.server_context()).start()
    mirror = FakeServer(tls=tls.server_context()).start()
    try:
        target = mirror.add("m.onnx", DATA) + "?X-Signature=abc"  # a pre-signed URL
        origin.raw_responses["/artifacts/m.onnx"] = redirect(target, 307)
        client = HttpClient(timeout_s=5, ca_bundle=tls.ca, https_redirects_only=True)
        with client:
            assert client.get(f"{origin.url}/artifacts/m.onnx").content == DATA
        assert [e["query"] for e in mirror.requests_for("m.onnx")] == ["X-Signature=abc"]
    finally:
        origin.stop()
        mirror.stop()


def test_redirect_loops_and_other_schemes_are_refused(fake_server: FakeServer) -> None:
    fake_server.raw_responses["/loop"] = redirect("/loop")
    fake_server.raw_responses["/ftp"] = redirect("ftp://example.invalid/m.onnx")
    with HttpClient(timeout_s=5, max_redirects=3) as client:
        with pytest.raises(RedirectError, match="more than 3 redirects"):
            client.get(f"{fake_server.url}/loop")
        with pytest.raises(RedirectError, match="refused"):
            client.get(f"{fake_server.url}/ftp")
    assert len([e for e in fake_server.log if e["path"] == "/loop"]) == 4
    with HttpClient(timeout_s=5, max_redirects=0) as client:  # 0: the 3xx is the answer
        assert client.get(f"{fake_server.url}/loop").status_code == 302
