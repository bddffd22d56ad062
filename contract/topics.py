"""MQTT topic names. One place, so server ACLs, agents and tests cannot disagree.

Direction and QoS:

- ``{prefix}/devices/{device_id}/target``   server -> device, QoS 1, retained. The current signed
  target (TargetMessage). Retained so that a device that was offline converges on reconnect.
- ``{prefix}/devices/{device_id}/status``   device -> server, QoS 1. Update progress (StatusReport).
- ``{prefix}/devices/{device_id}/metrics``  device -> server, QoS 0. Live metrics (MetricsReport).
- ``{prefix}/devices/{device_id}/monitor``  device -> server, QoS 1. One period's signal histograms
  (``contract.monitoring.MonitorSummary``). QoS 1 because a lost period is a hole in the drift
  record: the agent's outbox holds summaries while the broker is away.
- ``{prefix}/groups/{group}/lines/{line}/capture``  server -> devices of a group, QoS 1, retained.
  The group's signed capture policy (``contract.capture_policy``); under the group's subtree, which
  the broker ACL lets a member device read and nobody but the server write.
- ``{prefix}/lines/{line}/capture``  server -> every device of a line, QoS 1, retained: the policy
  for the line's whole fleet (group ``*``). Devices may read, never write it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOPIC_PREFIX = "edgeloop/v1"
DEVICE_TOPIC_KINDS = ("target", "status", "metrics", "monitor")  # last level of a device topic
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def valid_device_id(device_id: str) -> bool:
    """Device ids are also topic levels: no '/', '+', '#', and at most 128 characters."""
    return bool(_DEVICE_ID.match(device_id))


@dataclass(frozen=True)
class Topics:
    prefix: str = TOPIC_PREFIX

    def target(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/target"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/status"

    def metrics(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/metrics"

    def monitor(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/monitor"

    def capture_policy(self, model_line: str, group: str) -> str:
        """Where the signed capture policy of (line, group) is retained; group ``*``: the line's
        whole fleet."""
        if group == "*":
            return f"{self.prefix}/lines/{model_line}/capture"
        return f"{self.prefix}/groups/{group}/lines/{model_line}/capture"

    @property
    def all_lines_capture(self) -> str:
        """The wildcard a device's ACL grants read on (every line's fleet-wide policy)."""
        return f"{self.prefix}/lines/+/capture"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    @property
    def all_metrics(self) -> str:
        return f"{self.prefix}/devices/+/metrics"

    @property
    def all_monitor(self) -> str:
        return f"{self.prefix}/devices/+/monitor"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """Split a device topic into (device_id, kind); None if it is not one of ours."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        if len(rest) != 2 or not valid_device_id(rest[0]):
            return None
        if rest[1] not in DEVICE_TOPIC_KINDS:
            return None
        return rest[0], rest[1]
