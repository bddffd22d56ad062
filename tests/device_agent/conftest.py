"""Fixtures for the device agent tests (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.device_agent.agent_testkit import FakeServer, Rig


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def rig(tmp_path, signing_key) -> Iterator[Rig]:
    r = Rig(tmp_path / "state", signing_key)
    yield r
    r.close()
