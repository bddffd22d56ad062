"""Artifact garbage collection: the store's objects that nothing in the database refers to.

The store only grows: a worker hands back ``report.json`` and ``dataset.json`` (read into the
database when the job is registered, never again), a result the registrar refused, the files of
jobs that failed. ``edgeloop artifacts gc`` lists the objects no model version, release, line
(base pool) or unfinished job refers to (``registry.artifact_references``) and, with ``--apply``,
deletes them through the store's own ``delete``, the only code that removes an object.

Only objects stored more than ``older_than`` ago are collected: a worker stores its results
before it records their shas on the job, so a fresh object may be about to be referenced. An old
object becomes referenced again only when a worker's upload finds the same bytes already stored
(and so writes nothing); if the collector deletes it then, the registrar refuses the result as
missing and the job trains again (one attempt). Keep ``older_than`` longer than a training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from server.db import audit, registry
from server.release.artifacts import ArtifactStore, StoredObject

AUDIT_SHAS_KEPT = 1000  # sha256s listed in the audit record of one collection


@dataclass(frozen=True)
class GcPlan:
    """What a collection would delete, and what it keeps."""

    garbage: list[StoredObject]  # unreferenced and old enough, oldest first
    referenced: int  # objects kept because the database refers to them
    young: int  # unreferenced objects kept because they are newer than the cutoff

    @property
    def garbage_bytes(self) -> int:
        return sum(o.size for o in self.garbage)


def plan(objects: Iterable[StoredObject], references: set[str], *, cutoff: datetime) -> GcPlan:
    """Split the store's objects: garbage (unreferenced, stored before ``cutoff``) and kept."""
    garbage: list[StoredObject] = []
    referenced = young = 0
    for obj in objects:
        if obj.sha256 in references:
            referenced += 1
        elif obj.stored_at >= cutoff:
            young += 1
        else:
            garbage.append(obj)
    garbage.sort(key=lambda o: (o.stored_at, o.sha256))
    return GcPlan(garbage, referenced, young)


def collect(
    store: ArtifactStore,
    sessions: sessionmaker[Session],
    *,
    older_than: timedelta,
    now: datetime,
    apply: bool,
    actor: str = "cli",
) -> GcPlan:
    """Find the garbage and, with ``apply``, delete it (audited as ``artifacts.gc`` first, then
    deleted: persist, then act); returns the plan.

    Raises:
        ArtifactStoreUnavailableError: the store could not be listed or an object deleted.
    """
    objects = list(store.list_objects())  # first: an object stored later is not listed
    with sessions() as session:
        references = registry.artifact_references(session)
    found = plan(objects, references, cutoff=now - older_than)
    if not apply or not found.garbage:
        return found
    with sessions() as session:
        audit.record(
            session,
            actor=actor,
            action="artifacts.gc",
            subject=store.url,
            details={
                "objects": len(found.garbage),
                "bytes": found.garbage_bytes,
                "older_than_days": older_than / timedelta(days=1),
                "sha256": [o.sha256 for o in found.garbage[:AUDIT_SHAS_KEPT]],
            },
            now=now,
        )
        session.commit()
    for obj in found.garbage:
        store.delete(obj.sha256)
    return found


__all__ = ["GcPlan", "collect", "plan"]
