"""Supervision: a worker that dies is restarted (logged, counted), and while it is down the
agent's ``/healthz`` answers 503 and ``status()`` names it."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import httpx

from device_agent.cli import make_handler
from device_agent.supervisor import Supervisor
from tests.device_agent.agent_testkit import FakeServer, wait_until
from tests.device_agent.hostile_kit import Harness, genuine_target


def test_a_dying_worker_is_restarted_and_counted(caplog) -> None:
    stop = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    def worker() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise RecursionError("maximum recursion depth exceeded")
        release.wait()  # the third run stays up until the test lets it finish

    sup = Supervisor("t", stop, restart_base_s=0.05, restart_cap_s=0.1)
    sup.start("update", worker)
    wait_until(lambda: len(runs) == 3)
    status = sup.status()["update"]
    assert status == {
        "state": "running",
        "restarts": 2,
        "last_error": "RecursionError: maximum recursion depth exceeded",
    }
    assert sup.healthy and sup.restarts == 2
    assert "worker update died (RecursionError" in caplog.text
    release.set()
    wait_until(lambda: sup.status()["update"]["state"] == "done")  # a normal return: not rerun
    assert sup.healthy and len(runs) == 3
    stop.set()
    sup.join(5)


def test_down_while_waiting_for_the_restart() -> None:
    stop = threading.Event()
    sup = Supervisor("t", stop, restart_base_s=60.0, restart_cap_s=60.0)
    sup.start("metrics", lambda: 1 / 0)
    wait_until(lambda: sup.status()["metrics"]["state"] == "down")
    assert not sup.healthy
    stop.set()  # stopping ends the wait: the worker is done, not restarted
    sup.join(5)
    assert sup.status()["metrics"]["state"] == "done" and sup.restarts == 0


def test_healthz_is_503_while_the_update_worker_is_down(tmp_path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path / "state", fake_server)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(h.agent))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert httpx.get(f"{url}/healthz").status_code == 200
        # A fault no handler foresaw, once, right in the worker's loop.
        inbox = h.agent._inbox
        real_take = inbox.take_newest
        gate = threading.Event()

        def broken_take(timeout: float):  # type: ignore[no-untyped-def]
            inbox.take_newest = real_take  # type: ignore[method-assign]
            gate.wait(10)  # hold the restart back long enough to look at /healthz
            raise MemoryError("simulated")

        h.agent._supervisor._base = 2.0  # a slow restart: the down window is visible
        inbox.take_newest = broken_take  # type: ignore[method-assign]
        gate.set()
        wait_until(lambda: h.agent.status()["workers"]["update"]["state"] == "down")
        r = httpx.get(f"{url}/healthz")
        assert r.status_code == 503 and r.json()["workers_down"] == ["update"], r.text
        assert h.predict_version() == 1  # still serving
        wait_until(lambda: h.agent.status()["workers"]["update"]["state"] == "running")
        assert h.agent.status()["workers"]["update"]["restarts"] == 1
        assert httpx.get(f"{url}/healthz").status_code == 200
        # The restarted worker applies the next genuine release.
        t = genuine_target(h.trust, fake_server, 2)
        h.feed_mqtt(t.to_json())
        wait_until(lambda: h.agent.status()["model_version"] == 2, timeout=60)
    finally:
        httpd.shutdown()
        h.close()
