"""Label Studio's formats, pure: the tasks the labelling queue exports, the export read back.

Export (:func:`label_studio_tasks`): one task per queued sample, ``data.image`` the input as a
greyscale PNG data URL (:func:`image_data_url`, no image library), ``data.sample_id`` ours (Label
Studio assigns its own task ids), the model's guess as a pre-annotation of the ``Choices``
control ``label`` of :func:`label_config`. Import (:func:`parse_label_studio`): Label Studio's
JSON export, per task ``data.sample_id`` and the newest annotation that was not cancelled
(``annotations[].result[].value.choices``); a malformed task is a :class:`LabelFileError`
naming it (its position and Label Studio id).
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from xml.sax.saxutils import quoteattr

import numpy as np

from contract import InputSpec
from server.core.errors import InvalidRequestError

MAX_IMPORT_TASKS = 100_000  # tasks in one file
MAX_CHOICE_CHARS = 128  # characters of one Label Studio choice
PNG_MIN_SIDE = 64  # pixels: small inputs (8x8 digits) are scaled up by whole factors to this


class LabelFileError(InvalidRequestError):
    """An import file is not a Label Studio JSON export we can use (the message names the task);
    nothing it carries was applied."""


class Exportable(Protocol):
    """What a task is made of (``server.intake.labelling.QueuedSample``)."""

    @property
    def sample_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def model_line(self) -> str: ...
    @property
    def model_version(self) -> int: ...
    @property
    def predicted_label(self) -> int: ...
    @property
    def confidence(self) -> float: ...
    @property
    def captured_at(self) -> float: ...
    @property
    def input(self) -> bytes: ...


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
    samples: Iterable[Exportable], *, labels: Sequence[str], spec: InputSpec
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


__all__ = [
    "MAX_IMPORT_TASKS",
    "Exportable",
    "ImportedLabel",
    "LabelFileError",
    "image_data_url",
    "label_config",
    "label_studio_tasks",
    "parse_label_studio",
]
