"""Who may do what on the broker: the one rule set behind Mosquitto's ACL file and the HTTP
auth endpoint that clustered brokers call (EMQX, mosquitto-go-auth).

Pure core: no database, no files. :func:`device_rules` and :func:`server_rules` say which topic
patterns a login may read (subscribe to, receive) and write (publish to);
``server.identity.broker_acl`` renders them into Mosquitto's ``acl_file`` and
``server.identity.broker_http`` answers a broker's per-request question with :func:`permits`.
Changing a right here changes both paths at once.

Rights: a device reads only its own target topic and its groups' topics, and writes only its own
status, metrics and monitor topics. The server's user reads and writes every edgeloop topic.
Revoked devices have no rules (and cannot log in).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from contract.topics import TOPIC_PREFIX, Topics

MAX_TOPIC_BYTES = 65_535  # bytes, the longest MQTT topic name or filter (MQTT 5 1.5.4)


class Access(StrEnum):
    """A right on a topic pattern (the words of Mosquitto's ``acl_file``)."""

    read = "read"  # subscribe with a filter inside the pattern, receive a topic it matches
    write = "write"  # publish to a topic the pattern matches
    readwrite = "readwrite"

    def grants(self, wanted: Access) -> bool:
        return self is Access.readwrite or self is wanted


@dataclass(frozen=True)
class Rule:
    access: Access
    pattern: str  # an MQTT topic filter: '+' one level, '#' the rest


@dataclass(frozen=True)
class BrokerUser:
    """One device's broker identity: username = device id, ``$7$`` hash, its groups."""

    device_id: str
    mqtt_hash: str
    groups: tuple[str, ...] = ()


def device_rules(
    device_id: str, groups: tuple[str, ...] | list[str], *, prefix: str = TOPIC_PREFIX
) -> tuple[Rule, ...]:
    """The rights of an enrolled, unrevoked device."""
    topics = Topics(prefix)
    return (
        Rule(Access.read, topics.target(device_id)),
        Rule(Access.write, topics.status(device_id)),
        Rule(Access.write, topics.metrics(device_id)),
        Rule(Access.write, topics.monitor(device_id)),
        *(Rule(Access.read, f"{prefix}/groups/{g}/#") for g in groups),
    )


def server_rules(*, prefix: str = TOPIC_PREFIX) -> tuple[Rule, ...]:
    """The rights of the server's own broker login."""
    return (Rule(Access.readwrite, f"{prefix}/#"),)


def render_rules(rules: tuple[Rule, ...]) -> str:
    """``topic <access> <pattern>`` lines of Mosquitto's ``acl_file``."""
    return "".join(f"topic {r.access.value} {r.pattern}\n" for r in rules)


def unshared(topic: str) -> str:
    """The filter of an MQTT 5 shared subscription (``$share/<group>/<filter>``), or ``topic``.

    The rights are those of the filter: a server in a share group reads what it would read
    alone. A malformed share (no group or no filter) is returned as is and matches nothing."""
    if topic.startswith("$share/"):
        parts = topic.split("/", 2)
        if len(parts) == 3 and parts[1] and parts[2]:
            return parts[2]
    return topic


def valid_filter(topic: str) -> bool:
    """Whether ``topic`` is a well-formed MQTT topic filter (a topic name is one, too)."""
    if not topic or len(topic.encode()) > MAX_TOPIC_BYTES or "\x00" in topic:
        return False
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_within(wanted: str, pattern: str) -> bool:
    """Whether every topic the filter ``wanted`` matches is also matched by ``pattern``.

    A topic name (no wildcard) is the filter matching only itself, so this also answers "does
    ``pattern`` match this topic". ``pattern`` is trusted (ours); ``wanted`` must be valid
    (:func:`valid_filter`). Topics starting with ``$`` never match a pattern starting with a
    wildcard (MQTT 5 4.7.2), as a broker treats them.
    """
    want, pat = wanted.split("/"), pattern.split("/")
    if want[0].startswith("$") and pat[0] in ("+", "#"):
        return False
    for i, p in enumerate(pat):
        if p == "#":
            return True  # covers this level and everything below, whatever ``wanted`` holds
        if i >= len(want):
            return False
        w = want[i]
        if w == "#":
            return False  # ``wanted`` reaches deeper than a '+' or a literal level allows
        if p == "+":
            continue
        if w != p:  # a literal level: '+' in ``wanted`` would reach other values
            return False
    return len(want) == len(pat)


def permits(rules: tuple[Rule, ...], access: Access, topic: str) -> bool:
    """Whether ``rules`` allow ``access`` on ``topic``.

    ``access`` is ``read`` for a subscription (``topic`` is its filter, shared or not) or a
    delivery, ``write`` for a publish (a filter with wildcards is no topic name: refused),
    ``readwrite`` for both at once. A malformed topic is refused.
    """
    topic = unshared(topic) if access is Access.read else topic
    if not valid_filter(topic):
        return False
    if access is not Access.read and ("+" in topic.split("/") or topic.endswith("#")):
        return False
    wanted = (Access.read, Access.write) if access is Access.readwrite else (access,)
    return all(
        any(r.access.grants(w) and filter_within(topic, r.pattern) for r in rules) for w in wanted
    )
