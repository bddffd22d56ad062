"""Shadow releases on the device: run beside the champion, never swapped in, counted, dropped."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from contract import ManifestError, TargetMessage
from contract.manifest import Manifest
from device_agent.errors import SignatureInvalidError
from device_agent.verify import verify_target
from tests.device_agent.agent_testkit import (
    FakeServer,
    Rig,
    make_manifest,
    make_model,
    make_target,
    truth_label,
    wait_until,
)

M1, M2 = make_model(1), make_model(2)


def target(rig: Rig, srv: FakeServer, data: bytes, *, release: int, version: int, **kw: str):
    url = srv.add(f"m{version}-{release}.onnx", data)
    manifest = replace(make_manifest(data, release=release, model_version=version), **kw)
    return make_target(manifest, rig.key, url, rollout_id=5)


def test_a_shadow_release_runs_beside_the_champion_and_is_dropped_by_a_serve_target(
    rig: Rig, fake_server: FakeServer
) -> None:
    assert rig.updater.handle_target(target(rig, fake_server, M1, release=1, version=1)) == (
        "committed"
    )
    shadow_target = target(rig, fake_server, M2, release=2, version=2, deployment="shadow")
    assert rig.updater.handle_target(shadow_target).value == "shadow"
    steps = ["notified", "downloading", "verifying", "installing", "shadow"]
    assert rig.states()[-5:] == steps  # never "installed": not swapped in
    assert rig.serving_version() == 1 and rig.updater.highest_release == 2
    assert rig.reports[-1].model_version == 1 and rig.reports[-1].target_release == 2
    runner = rig.updater.shadow
    assert runner is not None and runner.model_version == 2

    # The champion's answers (v1), the challenger's run off the path; truth says v2 is right.
    rng = np.random.default_rng(0)
    xs = rng.uniform(0, 16, (60, 64)).astype(np.float32)
    champion = [truth_label(1, x) for x in xs]
    challenger = [truth_label(2, x) for x in xs]
    for i, x in enumerate(xs):
        runner.submit(f"p{i}", x, champion[i])
        runner.label(f"p{i}", challenger[i])  # may arrive before the comparison ran
    runner.label("never-served", 3)  # unknown predictions are ignored
    wait_until(lambda: runner.compared_total == len(xs))
    figures = runner.snapshot_and_reset()
    agree = sum(a == b for a, b in zip(champion, challenger, strict=True))
    assert (figures.compared, figures.agreed, figures.labelled) == (60, agree, 60)
    assert (figures.challenger_correct, figures.champion_correct) == (60, agree)
    assert sum(c.support for c in figures.class_counts) == 60
    assert all(c.correct == c.support for c in figures.class_counts)
    assert sum(c.correct for c in figures.champion_class_counts) == agree
    assert runner.snapshot_and_reset().compared == 0  # the window was reset

    # The same shadow target again (a re-delivered retained message): still in shadow.
    assert rig.updater.handle_target(shadow_target).value == "shadow"
    assert rig.updater.shadow is runner

    # A restart finds the job in shadow and loads the challenger again (re-verified).
    restarted = Rig(rig.config.state_dir, rig.key)
    try:
        assert restarted.updater.resume() is not None and restarted.serving_version() == 1
        restarted.updater.resume_shadow()
        assert restarted.updater.shadow is not None
        assert restarted.updater.shadow.model_version == 2
    finally:
        restarted.updater.drop_shadow()
        restarted.close()

    # The server withdraws it: a higher serve release of the champion drops the shadow run.
    back = target(rig, fake_server, M1, release=3, version=1)
    assert rig.updater.handle_target(back).value == "already_installed"
    assert rig.updater.shadow is None and rig.serving_version() == 1


def test_the_deployment_is_signed_and_validated(rig: Rig, fake_server: FakeServer) -> None:
    manifest = replace(make_manifest(M2, release=2, model_version=2), deployment="shadow")
    assert Manifest.from_payload(manifest.to_payload()).deployment == "shadow"
    plain = make_manifest(M2, release=2, model_version=2)
    assert "deployment" not in plain.to_dict()  # older payloads stay byte-identical
    assert Manifest.from_payload(plain.to_payload()).deployment == "serve"
    odd = json.dumps({**manifest.to_dict(), "deployment": "sometimes"}).encode()
    with pytest.raises(ManifestError, match="deployment must be one of: serve, shadow"):
        Manifest.from_payload(odd)
    # Flipping "shadow" to "serve" outside the signature is refused.
    t = target(rig, fake_server, M2, release=2, version=2, deployment="shadow").to_dict()
    payload = json.loads(base64.b64decode(t["envelope"]["payload"]))
    payload["deployment"] = "serve"
    t["envelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(SignatureInvalidError):
        verify_target(
            TargetMessage.from_dict(t),
            rig.updater._trusted,
            model_line="digits",
            highest_release=0,
            now=datetime.now(UTC),
        )
