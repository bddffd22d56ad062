"""The dashboard, driven in headless Chromium against a real server and a small real fleet.

The test watches a rollout wait for approval; signed in with a viewer token it finds the Approve
button disabled (and the API refuses the viewer anyway), then signs in as an approver, approves
with a click and sees the progress as the canary devices install the new model. A screenshot is
saved to ``$EDGELOOP_TEST_ARTIFACTS`` (default ``var/test-artifacts``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from device_agent import AgentConfig
from firmware_sim.fleet import Fleet, FleetConfig, Inputs
from firmware_sim.services import ServerProcess
from tests.conftest import FAST_SERVER_ENV, auth_headers, poll
from training.data import digits_pools

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("EDGELOOP_TEST_ARTIFACTS", "var/test-artifacts"))


class LenientFleet(Fleet):
    """Devices whose own probation does not judge accuracy: this test is about the dashboard
    and rights, not about the quality gates (tests/rollouts covers those)."""

    def agent_config(self, index: int) -> AgentConfig:
        return dataclasses.replace(
            super().agent_config(index),
            probation_max_accuracy_drop=1.0,
            probation_max_error_rate_increase=1.0,
            probation_max_latency_ratio=100.0,
        )


@pytest.fixture
def server(broker, workdir) -> Iterator[ServerProcess]:
    # The server's quality gates are lenient too, for the same reason: three devices share this
    # test process's CPU with the browser, so their p95 latencies (means of 0.5 s window
    # maxima) are noise. On a loaded CI machine this rollout once failed to complete within
    # 240 s (cause not recorded; a timeout now prints the rollout, devices and server log).
    env = {
        **FAST_SERVER_ENV,
        "EDGELOOP_CANARY_PERCENT": "34",
        "EDGELOOP_MAX_LATENCY_RATIO": "100",
        "EDGELOOP_LATENCY_SLACK_MS": "1000",
        "EDGELOOP_MAX_ACCURACY_DROP": "1",
        "EDGELOOP_MAX_CLASS_RECALL_DROP": "1",
        "EDGELOOP_INSTALL_TIMEOUT_S": "60",
        "EDGELOOP_ROLLOUT_RETRY_BACKOFF_S": "2",
    }
    srv = ServerProcess(workdir / "server", mqtt_port=broker.port, env=env).start()
    yield srv
    srv.stop()


@pytest.fixture
def browser_page():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/setup.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def test_operator_watches_and_approves_a_rollout_in_the_dashboard(
    server, broker, workdir, browser_page
):
    api = f"{server.url}/api/v1"
    admin = server.headers
    poll(
        "factory model",
        lambda: httpx.get(f"{api}/model-lines/digits", headers=admin).json()["champion_version"],
    )
    tokens = {
        name: httpx.post(
            f"{api}/operators/tokens", json={"name": name, "role": role}, headers=admin
        ).json()["token"]
        for name, role in (("vic", "viewer"), ("dana", "approver"))
    }
    pools = digits_pools()
    fleet = LenientFleet(
        FleetConfig(
            server_url=server.url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            trusted_keys=[],
            trusted_root=server.root_path.read_bytes(),  # the pinned root v1
            state_root=workdir / "devices",
            devices=3,
            metrics_interval_s=0.5,
            bootstrap_token=server.enrollment_token(max_uses=3),
        ),
        Inputs(pools.field.X, pools.field.X, pools.field.y),  # no drift needed here
    )
    fleet.start()
    try:
        assert fleet.wait_ready(60)
        job = httpx.post(
            f"{api}/training-jobs", json={"model_line": "digits"}, headers=admin
        ).json()
        poll(
            "challenger",
            lambda: (
                httpx.get(f"{api}/training-jobs/{job['id']}", headers=admin).json()["status"]
                == "succeeded"
            ),
        )
        rollout = poll(
            "pending rollout",
            lambda: next(
                (
                    r
                    for r in httpx.get(f"{api}/rollouts", headers=admin).json()
                    if r["state"] == "pending_approval"
                ),
                None,
            ),
        )
        rid = rollout["id"]

        page = browser_page
        page.goto(f"{server.url}/")
        assert "sign in" in page.locator("#health").inner_text(timeout=30_000)
        # Without a token the page says how to get one instead of showing empty panels.
        hint = page.locator("#lines .signin").inner_text(timeout=30_000)
        assert "tokens create" in hint and "edgeloop-dev-admin-token" in hint

        def sign_in(name: str, role: str) -> None:
            page.fill("#token", tokens[name])
            page.dispatch_event("#token", "change")
            page.wait_for_function(
                f"document.querySelector('#whoami').textContent === '{name} ({role})'",
                timeout=30_000,
            )

        # As a viewer: the rollout is visible, Approve is disabled, and the API says no.
        sign_in("vic", "viewer")
        card = page.locator(f"#rollout-{rid}")
        card.wait_for(timeout=60_000)
        assert card.get_attribute("data-state") == "pending_approval"
        approve = card.get_by_role("button", name="Approve")
        approve.wait_for(timeout=10_000)
        assert approve.is_disabled()
        assert approve.get_attribute("title") == "needs the approver role"
        forced = page.evaluate(
            """async ([id, token]) => {
                const r = await fetch(`/api/v1/rollouts/${id}/approve`, {method: "POST",
                  headers: {"Content-Type": "application/json", Authorization: `Bearer ${token}`},
                  body: "{}"});
                return [r.status, (await r.json()).detail];
            }""",
            [rid, tokens["vic"]],
        )
        assert forced[0] == 403 and "needs approver" in forced[1], forced
        viewer_view = httpx.get(f"{api}/rollouts/{rid}", headers=admin).json()
        assert viewer_view["state"] == "pending_approval"
        # A fleet overview and the versions table are on the page too.
        page.locator(".card[data-line='digits']").wait_for(timeout=10_000)
        assert "3 devices" in page.locator(".card[data-line='digits']").inner_text()

        # As an approver: the same button is live; one click starts the canary.
        sign_in("dana", "approver")
        page.wait_for_selector(f"#rollout-{rid} button[data-act='approve']:not([disabled])")
        fleet.start_traffic(5.0)
        card.get_by_role("button", name="Approve").click()

        page.wait_for_selector(
            f"#rollout-{rid}:not([data-state='pending_approval'])", timeout=60_000
        )
        assert "approved by dana" in card.inner_text()
        # Progress: the canary stage fills as the canary device installs v2, then everyone.
        try:
            page.wait_for_function(
                f"document.querySelector('#rollout-{rid}').dataset.state === 'completed'",
                timeout=240_000,
            )
        except Exception as exc:  # say where the rollout stood, not only that it timed out
            detail = httpx.get(f"{api}/rollouts/{rid}", headers=admin).json()
            pytest.fail(
                f"rollout {rid} not completed: {exc}\nrollout: {detail}\n"
                f"devices: {[d.agent.status() for d in fleet.devices]}\n"
                f"server log:\n{server.log_tail(80)}"
            )
        assert "3/3 on target" in card.inner_text() or "2/2 on target" in card.inner_text()
        # The latency chart has a time axis (first, middle and last bucket).
        page.wait_for_function(
            "document.querySelectorAll('#chart-latency text.time').length === 3", timeout=60_000
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard-rollout.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        server_view = httpx.get(
            f"{api}/rollouts/{rid}", headers=auth_headers(tokens["dana"])
        ).json()
        assert server_view["state"] == "completed" and server_view["approved_by"] == "dana"
    finally:
        fleet.stop()
