"""A rollout's audience: the signed targeting (contract.Targeting) and who matches it.

The operator's targeting (groups, hardware classes, device ids, lowest runtime) is stored with
the rollout and signed into the releases it makes; the opset is the model's own, read from the
version's training report. The server applies the same criteria as the device
(``device_agent.verify.check_targeting``) to pick members, so a device outside the targeting is
never sent the release: it would refuse it. The runtime version and opset are left to the
device, since the server does not know which ONNX Runtime a device runs.

The hardware class is matched against the ``hardware`` a device registered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from contract.envelope import SignedEnvelope
from contract.manifest import Manifest, Targeting


def targeting_from_request(body: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a rollout stores: the validated targeting without opset, or None when empty.

    Raises:
        ManifestError: the targeting is not valid (the request schema checks it first).
    """
    if not body:
        return None
    targeting = Targeting.from_dict({**body, "opset": None})
    return targeting.to_dict() if targeting != Targeting() else None


def targeting_of(stored: Mapping[str, Any] | None) -> Targeting:
    """The rollout's stored targeting (``Targeting()``, any device, when None)."""
    return Targeting.from_dict(stored) if stored else Targeting()


def device_matches(
    targeting: Targeting, *, device_id: str, hardware: str | None, groups: Iterable[str]
) -> bool:
    """Whether a device falls inside the targeting's ids, groups and hardware classes."""
    if targeting.device_ids and device_id not in targeting.device_ids:
        return False
    if targeting.groups and not set(targeting.groups) & set(groups):
        return False
    return not (targeting.hardware_classes and hardware not in targeting.hardware_classes)


def signed_targeting(envelope: Mapping[str, Any]) -> tuple[Targeting, str]:
    """The targeting and deployment a release the server signed carries (its own bytes).

    Raises:
        ContractError: the stored envelope is not a valid manifest.
    """
    manifest = Manifest.from_payload(SignedEnvelope.from_dict(envelope).payload)
    return manifest.targeting, manifest.deployment


def narrows_devices(targeting: Targeting) -> bool:
    """Whether the targeting names devices, groups or hardware classes (the server's part)."""
    return bool(targeting.device_ids or targeting.groups or targeting.hardware_classes)


def model_opset(report: Mapping[str, Any] | None) -> int | None:
    """The ONNX default-domain opset a training report records (``training.pipeline``)."""
    opset = (report or {}).get("opset")
    if isinstance(opset, int) and not isinstance(opset, bool) and opset > 0:
        return opset
    return None


__all__ = [
    "device_matches",
    "model_opset",
    "narrows_devices",
    "signed_targeting",
    "targeting_from_request",
    "targeting_of",
]
