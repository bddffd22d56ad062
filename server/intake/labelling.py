"""The labelling queue: samples captured without a label, their export, the labels that fill them.

Devices under a raised capture policy send uncertain inputs without a label
(``SampleRecord.true_label`` None). They are stored like any sample (validated, deduplicated,
charged to the quota) but count toward no retraining threshold and enter no dataset version until
a label fills them, from one of two sources, recorded on the sample (``server.db.sample_store``:
``label_source``, ``labelled_by``, ``labelled_at``):

- the device: it learns the ground truth later and sends the same ``sample_id`` again with the
  label (:func:`fill_device_labels`, called by ``server.intake.samples`` in the upload's
  transaction; the filled sample is screened and counted like a new one);
- an operator: the queue (:func:`queued`) is exported as Label Studio tasks, labelled there, and
  Label Studio's JSON export is imported (the formats, pure: ``server.intake.label_studio``;
  then :func:`import_labels`).

An import is all or nothing: a file with any malformed task, an unknown sample or a choice that
is not one of the line's labels is refused with an error naming the task, and nothing is
changed. It is idempotent: a sample already carrying the imported label is "unchanged"; one
carrying another label keeps it and is listed as a conflict (the first label wins, whoever gave
it). A sample labelled by the device and the operator keeps the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from contract import InputSpec
from server.core.errors import NotFoundError
from server.db import audit
from server.db.registry import ModelLine
from server.db.sample_store import (
    LABEL_DEVICE,
    LABEL_OPERATOR,
    ORIGIN_CAPTURE,
    Sample,
    quarantined_ids,
)
from server.intake.label_studio import MAX_CHOICE_CHARS, ImportedLabel, LabelFileError
from server.retrain.scheduler import evidence_floor

# Limits on one import (a Label Studio export of the whole queue is well within them).
MAX_IMPORT_BYTES = 256 * 1024 * 1024  # bytes of one import file (exports carry image data)
MAX_EXPORT_TASKS = 10_000  # tasks one export returns
MAX_ACTOR_CHARS = 128
_ID_CHUNK = 500  # ids per IN (...) query

# (session, line, labelled samples that count, now) -> a queued training job id, or None.
CountLabelled = Callable[[Session, str, int, datetime], int | None]


# ---------------------------------------------------------------- device labels (upload path)


def merge_batch(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One upload batch may hold a sample captured without a label and, later in the batch, the
    same ``sample_id`` with its ground truth (feedback came before the batch was sent): the two
    become one labelled row whose origin stays ``device_capture``. Other repeats are left for
    the caller to count as duplicates."""
    first: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for row in rows:
        seen = first.get(row["sample_id"])
        if seen is None:
            first[row["sample_id"]] = row
            out.append(row)
            continue
        if (
            seen["true_label"] is None
            and row["true_label"] is not None
            and seen["content_sha256"] == row["content_sha256"]
            and seen["device_id"] == row["device_id"]
        ):
            seen["true_label"] = row["true_label"]
            seen["label_source"] = LABEL_DEVICE
            seen["labelled_at"] = row["received_at"]
            continue
        out.append(row)
    return out


def fill_device_labels(
    session: Session, *, rows: Sequence[dict[str, Any]], stored: set[str], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fill stored unlabelled samples from labelled rows of the same ``sample_id`` and device.

    Returns:
        (filled, refused): the filled rows (the upload's validated rows, marked
        ``device_capture``, for the caller to screen and count) and the refusals to report
        (``{"sample_id", "reason"}``). Rows of samples already labelled are neither: they are
        the caller's duplicates.
    """
    wanted = {
        r["sample_id"]: r for r in rows if r["sample_id"] in stored and r["true_label"] is not None
    }
    if not wanted:
        return [], []
    found = {
        s.sample_id: s
        for s in session.execute(
            select(
                Sample.sample_id, Sample.device_id, Sample.content_sha256, Sample.true_label
            ).where(Sample.sample_id.in_(list(wanted)), Sample.true_label.is_(None))
        )
    }
    filled: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for sid, row in wanted.items():
        have = found.get(sid)
        if have is None:
            continue  # already labelled: a duplicate
        if have.device_id != row["device_id"] or have.content_sha256 != row["content_sha256"]:
            refused.append(
                {
                    "sample_id": sid,
                    "reason": "label refused: the stored sample of this id was captured by "
                    "another device or holds another input",
                }
            )
            continue
        done = session.execute(
            update(Sample)
            .where(Sample.sample_id == sid, Sample.true_label.is_(None))
            .values(true_label=row["true_label"], label_source=LABEL_DEVICE, labelled_at=now)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            filled.append(
                {**row, "origin": ORIGIN_CAPTURE, "label_source": LABEL_DEVICE, "labelled_at": now}
            )
    return filled, refused


# ---------------------------------------------------------------- the queue


@dataclass(frozen=True)
class QueuedSample:
    sample_id: str
    device_id: str
    model_line: str
    model_version: int
    predicted_label: int
    confidence: float
    captured_at: float
    received_at: datetime
    input: bytes


def _line(session: Session, name: str) -> ModelLine:
    line = session.get(ModelLine, name)
    if line is None:
        raise NotFoundError(f"unknown model line {name!r}")
    return line


def line_labels(session: Session, *, line: str) -> tuple[list[str], InputSpec]:
    """The line's label names and input spec (what an export needs).

    Raises:
        NotFoundError: unknown line.
    """
    row = _line(session, line)
    return list(row.labels), InputSpec.from_dict(row.input_spec)


def queue_size(session: Session, *, line: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Sample)
            .where(
                Sample.model_line == line,
                Sample.true_label.is_(None),
                Sample.sample_id.not_in(quarantined_ids(line=line)),
            )
        )
        or 0
    )


def labelled_by_source(session: Session, *, line: str) -> dict[str, int]:
    """The line's labelled samples by where the label came from (``device``, ``operator``);
    quarantined ones left out, as from :func:`queue_size`. Every source appears, 0 if none."""
    source = func.coalesce(Sample.label_source, LABEL_DEVICE)
    counts = {LABEL_DEVICE: 0, LABEL_OPERATOR: 0}
    for name, n in session.execute(
        select(source, func.count())
        .where(
            Sample.model_line == line,
            Sample.true_label.is_not(None),
            Sample.sample_id.not_in(quarantined_ids(line=line)),
        )
        .group_by(source)
    ):
        counts[str(name)] = int(n)
    return counts


def queued(session: Session, *, line: str, limit: int, offset: int = 0) -> list[QueuedSample]:
    """The line's samples waiting for a label, oldest first (quarantined ones left out).

    Raises:
        NotFoundError: unknown line.
    """
    _line(session, line)
    rows = session.execute(
        select(
            Sample.sample_id,
            Sample.device_id,
            Sample.model_line,
            Sample.model_version,
            Sample.predicted_label,
            Sample.confidence,
            Sample.captured_at,
            Sample.received_at,
            Sample.input,
        )
        .where(
            Sample.model_line == line,
            Sample.true_label.is_(None),
            Sample.sample_id.not_in(quarantined_ids(line=line)),
        )
        .order_by(Sample.received_at, Sample.sample_id)
        .offset(offset)
        .limit(min(limit, MAX_EXPORT_TASKS))
    ).all()
    return [QueuedSample(*r) for r in rows]


# ---------------------------------------------------------------- import (operator labels)


@dataclass
class ImportResult:
    tasks: int = 0  # tasks carrying a label
    skipped: int = 0  # tasks without a usable annotation
    labelled: list[str] = field(default_factory=list)  # sample ids filled now
    unchanged: int = 0  # samples already carrying that label (a repeated import)
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # kept their label
    jobs_triggered: list[int] = field(default_factory=list)


def import_labels(
    session: Session,
    *,
    labels: Sequence[ImportedLabel],
    skipped: int,
    actor: str,
    now: datetime,
    count: CountLabelled,
) -> ImportResult:
    """Fill the imported labels (all or nothing), audit the import, count the new labels toward
    their lines' thresholds (``count``: the intake's counter); commits.

    Raises:
        LabelFileError: a task names an unknown sample, or a label its line does not have
            (nothing is changed).
    """
    result = ImportResult(tasks=len(labels), skipped=skipped)
    ids = [lab.sample_id for lab in labels]
    found: dict[str, Any] = {}  # sample id -> its row
    for start in range(0, len(ids), _ID_CHUNK):
        for stored in session.execute(
            select(
                Sample.sample_id,
                Sample.model_line,
                Sample.model_version,
                Sample.true_label,
                Sample.label_source,
            ).where(Sample.sample_id.in_(ids[start : start + _ID_CHUNK]))
        ):
            found[stored.sample_id] = stored
    names: dict[str, list[str]] = {}
    for line_name, line_labels in session.execute(
        select(ModelLine.name, ModelLine.labels).where(
            ModelLine.name.in_({r.model_line for r in found.values()})
        )
    ):
        names[line_name] = list(line_labels)
    plan: list[tuple[ImportedLabel, Any, int]] = []
    for lab in labels:  # check everything before changing anything
        row: Any = found.get(lab.sample_id)
        if row is None:
            raise LabelFileError(f"{lab.task}: no such sample on this server")
        line_labels = names.get(row.model_line, [])
        if lab.choice not in line_labels:
            raise LabelFileError(
                f"{lab.task}: {lab.choice[:MAX_CHOICE_CHARS]!r} is not a label of model line "
                f"{row.model_line!r} ({', '.join(line_labels[:20])})"
            )
        plan.append((lab, row, line_labels.index(lab.choice)))
    actor = actor[:MAX_ACTOR_CHARS]
    per_line: dict[str, list[tuple[str, int]]] = {}
    for lab, row, index in plan:
        if row.true_label is not None:
            if row.true_label == index:
                result.unchanged += 1
            else:
                result.conflicts.append(
                    {
                        "task": lab.task,
                        "sample_id": lab.sample_id,
                        "reason": f"already labelled {names[row.model_line][row.true_label]!r} "
                        f"(source {row.label_source or 'device'}); kept",
                    }
                )
            continue
        done = session.execute(
            update(Sample)
            .where(Sample.sample_id == lab.sample_id, Sample.true_label.is_(None))
            .values(
                true_label=index,
                label_source=LABEL_OPERATOR,
                labelled_by=actor,
                labelled_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            result.labelled.append(lab.sample_id)
            per_line.setdefault(row.model_line, []).append((lab.sample_id, row.model_version))
    if result.labelled or result.conflicts:
        audit.record(
            session,
            actor=actor,
            action="samples.label_import",
            subject="lines:" + ",".join(sorted(per_line) or sorted(names)),
            details={
                "format": "label-studio",
                "labelled": len(result.labelled),
                "unchanged": result.unchanged,
                "conflicts": len(result.conflicts),
                "skipped": skipped,
            },
            now=now,
        )
    floors = evidence_floor(session, lines=set(per_line))
    for line_name in sorted(per_line):  # fixed lock order, as the upload path
        held = set(
            session.scalars(quarantined_ids(line=line_name)).all()
        )  # a distrusted device's pending samples: labelled, but not evidence
        n = sum(
            1
            for sid, version in per_line[line_name]
            if sid not in held and version >= floors.get(line_name, 0)
        )
        if n:
            job_id = count(session, line_name, n, now)
            if job_id is not None:
                result.jobs_triggered.append(job_id)
    session.commit()
    return result


__all__ = [
    "MAX_EXPORT_TASKS",
    "MAX_IMPORT_BYTES",
    "CountLabelled",
    "ImportResult",
    "QueuedSample",
    "fill_device_labels",
    "import_labels",
    "line_labels",
    "merge_batch",
    "queue_size",
    "queued",
]
