"""The labelling queue: samples captured without a label, their export, the labels that fill them.

Devices under a raised capture policy send uncertain inputs without a label
(``SampleRecord.true_label`` None). They are stored like any sample (validated, deduplicated,
charged to the quota) but count toward no retraining threshold and enter no dataset version until
a label fills them, from one of two sources, recorded on the sample (``server.db.sample_store``:
``label_source``, ``labelled_by``, ``labelled_at``):

- the device: it learns the ground truth later and sends the same ``sample_id`` again with the
  label (:func:`fill_device_labels`, called by ``server.intake.samples`` in the upload's
  transaction; the filled sample is screened and counted like a new one);
- an operator: the queue is exported as Label Studio tasks (:func:`label_studio_tasks`, each
  task's ``data.image`` a PNG data URL of the input, ``data.sample_id`` ours, the model's guess
  as a prediction), labelled there, and Label Studio's JSON export is imported
  (:func:`parse_label_studio`, pure, then :func:`import_labels`).

An import is all or nothing: a file with any malformed task, an unknown sample or a choice that
is not one of the line's labels is refused with an error naming the task, and nothing is
changed. It is idempotent: a sample already carrying the imported label is "unchanged"; one
carrying another label keeps it and is listed as a conflict (the first label wins, whoever gave
it). A sample labelled by the device and the operator keeps the first.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from contract import InputSpec
from server.core.errors import InvalidRequestError, NotFoundError
from server.db import audit
from server.db.registry import ModelLine
from server.db.sample_store import (
    LABEL_DEVICE,
    LABEL_OPERATOR,
    ORIGIN_CAPTURE,
    Sample,
    quarantined_ids,
)
from server.retrain.scheduler import evidence_floor

# Limits on one import (a Label Studio export of the whole queue is well within them).
MAX_IMPORT_TASKS = 100_000  # tasks in one file
MAX_IMPORT_BYTES = 256 * 1024 * 1024  # bytes of one import file (exports carry image data)
MAX_EXPORT_TASKS = 10_000  # tasks one export returns
MAX_CHOICE_CHARS = 128  # characters of one Label Studio choice
MAX_ACTOR_CHARS = 128
_ID_CHUNK = 500  # ids per IN (...) query
PNG_MIN_SIDE = 64  # pixels: small inputs (8x8 digits) are scaled up by whole factors to this

# (session, line, labelled samples that count, now) -> a queued training job id, or None.
CountLabelled = Callable[[Session, str, int, datetime], int | None]


class LabelFileError(InvalidRequestError):
    """An import file is not a Label Studio JSON export we can use (the message names the task);
    nothing it carries was applied."""


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


# ---------------------------------------------------------------- the queue and its export


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


def _png(gray: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``gray`` (uint8, height x width): no image library needed."""
    h, w = gray.shape
    raw = b"".join(b"\x00" + gray[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def image_data_url(values: bytes, spec: InputSpec) -> str:
    """The input as a PNG data URL for a labeller: values scaled from the spec's range to
    0..255, laid out as the spec's last two dimensions, or as a square when the input is a flat
    vector of a square size (8x8 digits), else one row; scaled up to ``PNG_MIN_SIDE`` pixels."""
    x = np.frombuffer(values, dtype="<f4")
    dims = [d for d in spec.shape if d > 0]
    if len(dims) >= 2 and dims[-1] * dims[-2] == x.size:
        h, w = dims[-2], dims[-1]
    elif math.isqrt(x.size) ** 2 == x.size:
        h = w = math.isqrt(x.size)
    else:
        h, w = 1, x.size
    span = (spec.max - spec.min) or 1.0
    gray = np.clip((x[: h * w] - spec.min) / span * 255.0, 0, 255).round().astype(np.uint8)
    scale = max(1, PNG_MIN_SIDE // max(1, min(h, w)))
    img = np.kron(gray.reshape(h, w), np.ones((scale, scale), dtype=np.uint8))
    return "data:image/png;base64," + base64.b64encode(_png(img)).decode("ascii")


def label_studio_tasks(
    samples: Iterable[QueuedSample], *, labels: Sequence[str], spec: InputSpec
) -> list[dict[str, Any]]:
    """Label Studio import tasks (JSON list): ``data.image`` to label, ``data.sample_id`` to
    come back with, and the model's guess as a pre-annotation (``predictions``) of the
    ``Choices`` control named ``label`` (see :func:`label_config`)."""
    out = []
    for s in samples:
        guess = labels[s.predicted_label] if 0 <= s.predicted_label < len(labels) else None
        task: dict[str, Any] = {
            "data": {
                "image": image_data_url(s.input, spec),
                "sample_id": s.sample_id,
                "model_line": s.model_line,
                "model_version": s.model_version,
                "device_id": s.device_id,
                "predicted": guess,
                "confidence": round(float(s.confidence), 6),
                "captured_at": s.captured_at,
            }
        }
        if guess is not None:
            task["predictions"] = [
                {
                    "model_version": f"{s.model_line} v{s.model_version}",
                    "score": round(float(s.confidence), 6),
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [guess]},
                        }
                    ],
                }
            ]
        out.append(task)
    return out


def label_config(labels: Sequence[str]) -> str:
    """The Label Studio labelling config the exported tasks fit (one image, one choice)."""
    choices = "".join(f"    <Choice value={quoteattr(lab)}/>\n" for lab in labels)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        '  <Choices name="label" toName="image" choice="single" showInline="true">\n'
        f"{choices}  </Choices>\n</View>\n"
    )


# ---------------------------------------------------------------- import (operator labels)


@dataclass(frozen=True)
class ImportedLabel:
    task: str  # how the error messages name the task: "task 3 (id 17)"
    sample_id: str
    choice: str


def _task_name(i: int, task: Any) -> str:
    tid = task.get("id") if isinstance(task, Mapping) else None
    if isinstance(tid, int | str) and not isinstance(tid, bool) and len(str(tid)) <= 64:
        return f"task {i} (id {tid})"
    return f"task {i}"


def _choice_of(name: str, annotations: Any) -> str | None:
    """The choice of the newest annotation that was not cancelled; None when there is none."""
    if annotations is None:
        return None
    if not isinstance(annotations, list):
        raise LabelFileError(f"{name}: annotations must be a list")
    choice: str | None = None
    for j, ann in enumerate(annotations):
        if not isinstance(ann, Mapping):
            raise LabelFileError(f"{name}: annotations[{j}] must be an object")
        if ann.get("was_cancelled") is True:
            continue
        result = ann.get("result")
        if not isinstance(result, list):
            raise LabelFileError(f"{name}: annotations[{j}].result must be a list")
        picked = []
        for k, region in enumerate(result):
            value = region.get("value") if isinstance(region, Mapping) else None
            if not isinstance(value, Mapping) or "choices" not in value:
                continue  # another control's region (a comment, a rating): not ours
            choices = value["choices"]
            if (
                not isinstance(choices, list)
                or len(choices) != 1
                or not isinstance(choices[0], str)
                or not 0 < len(choices[0]) <= MAX_CHOICE_CHARS
            ):
                raise LabelFileError(
                    f"{name}: annotations[{j}].result[{k}].value.choices must hold exactly one "
                    "label name"
                )
            picked.append(choices[0])
        if len(set(picked)) > 1:
            raise LabelFileError(
                f"{name}: annotations[{j}] chooses several labels {sorted(set(picked))[:5]}"
            )
        if picked:
            choice = picked[0]  # later annotations win
    return choice


def parse_label_studio(data: Any) -> tuple[list[ImportedLabel], int]:
    """Read Label Studio's JSON export (pure). Returns the labels found and how many tasks had
    no usable annotation yet (skipped).

    Raises:
        LabelFileError: not a list of tasks, too many, or a task that is malformed (the message
            names it: its position and Label Studio id).
    """
    if not isinstance(data, list):
        raise LabelFileError("a Label Studio JSON export is a list of tasks")
    if len(data) > MAX_IMPORT_TASKS:
        raise LabelFileError(f"{len(data)} tasks, limit {MAX_IMPORT_TASKS} per import")
    out: list[ImportedLabel] = []
    skipped = 0
    seen: dict[str, str] = {}
    for i, task in enumerate(data):
        name = _task_name(i, task)
        if not isinstance(task, Mapping):
            raise LabelFileError(f"{name}: must be an object")
        payload = task.get("data")
        if not isinstance(payload, Mapping):
            raise LabelFileError(f"{name}: has no data object")
        sid = payload.get("sample_id")
        if not isinstance(sid, str) or not 0 < len(sid) <= 64:
            raise LabelFileError(f"{name}: data.sample_id must be the exported sample id")
        name = f"{name}, sample {sid}"
        choice = _choice_of(name, task.get("annotations"))
        if choice is None:
            skipped += 1
            continue
        if sid in seen and seen[sid] != choice:
            raise LabelFileError(f"{name}: labelled {choice!r} here and {seen[sid]!r} elsewhere")
        if sid not in seen:
            seen[sid] = choice
            out.append(ImportedLabel(name, sid, choice))
    return out, skipped


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
    "MAX_IMPORT_BYTES",
    "ImportResult",
    "ImportedLabel",
    "LabelFileError",
    "QueuedSample",
    "fill_device_labels",
    "image_data_url",
    "import_labels",
    "label_config",
    "label_studio_tasks",
    "line_labels",
    "merge_batch",
    "parse_label_studio",
    "queue_size",
    "queued",
]
