"""Sample intake: per-sample validation, idempotent bulk insert, threshold-triggered retraining.

``validate_sample`` is pure (a record and the facts it is checked against in, a row or a reason
out); ``upload_samples`` sorts a batch with a fixed number of queries (devices, lines,
releases, stored ids, stored content hashes), screens it in a read-only transaction, then sorts
it again in one short write transaction against what is stored by then and writes it: one bulk
insert, the screening verdicts, one counter update per line. Screening (the champion's inference
and a neighbour search) is the slow part; outside the write transaction it holds no lock, which
on SQLite is the one writer every approval, report and upload waits for.

The rules a sample is checked against come from the line's current *signed* release manifest:
its ``input_spec`` (value count, dtype, value range) and ``labels``. Before the first release
the line's registered spec is used. Rejections carry a reason the uploader can read; an id
already stored is a duplicate (idempotent retry), while the same input under another id is
rejected by content hash (sha256 of the float32 bytes).

A sample may come without a label (``true_label`` null: captured under a capture policy); it is
stored for the labelling queue and counts toward nothing until a label fills it. The filling and
the queue live in ``server.intake.labelling``; the upload calls it for rows of stored ids.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contract import ContractError, InputSpec, Manifest, MessageError, decode_input
from contract.envelope import SignedEnvelope
from server.db import job_queue
from server.db.fleet import Device
from server.db.registry import ModelLine, Release
from server.db.sample_store import LABEL_DEVICE, ORIGIN_CAPTURE, ORIGIN_DEVICE, Sample
from server.intake import labelling
from server.intake.screening import Assessment, Screener
from server.intake.upload_limits import charge_quota
from server.retrain.scheduler import cooldown_of, evidence_floor

MAX_SAMPLE_ID_CHARS = 64
MAX_INT32 = 2**31 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INSERT_RETRIES = 3  # a concurrent upload of the same ids makes the insert conflict; retry


class SampleRejected(Exception):
    """Internal: one sample is not acceptable (the message is the reason reported back)."""


_INTEGRAL_DTYPES = {"uint8", "int64"}


@dataclass(frozen=True)
class LineFacts:
    """What samples of one line are checked against, and where it came from."""

    name: str
    spec: InputSpec
    n_labels: int
    source: str = "registered input_spec"  # or "signed release N"


@dataclass
class _Sorted:
    """A batch sorted against what is stored: new rows by id, and what is not new."""

    fresh: dict[str, dict[str, Any]]
    duplicates: int
    rejected: list[dict[str, Any]]
    filled: list[dict[str, Any]] = field(default_factory=list)  # stored captures now labelled


@dataclass
class UploadResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)  # stored, held by screening
    labelled: int = 0  # stored unlabelled samples whose label this upload filled
    jobs_triggered: list[int] = field(default_factory=list)


def _get(rec: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in rec or rec[name] is None:
        raise SampleRejected(f"missing field {name!r}")
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SampleRejected(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _number(rec: Mapping[str, Any], name: str) -> float:
    value = float(_get(rec, name, (int, float)))
    if not math.isfinite(value):
        raise SampleRejected(f"field {name!r} must be a finite number")
    return value


def sample_id_of(rec: Any) -> str | None:
    if isinstance(rec, Mapping) and isinstance(rec.get("sample_id"), str):
        return str(rec["sample_id"])[:MAX_SAMPLE_ID_CHARS]
    return None


def validate_sample(
    rec: Any,
    *,
    devices: Mapping[str, str],
    lines: Mapping[str, LineFacts],
    now: datetime,
) -> dict[str, Any]:
    """Check one sample record and return the row to insert.

    Args:
        rec: the JSON value the device sent.
        devices: registered device_id -> its model line.
        lines: known model lines.

    Raises:
        SampleRejected: with the reason reported to the device.
    """
    if not isinstance(rec, Mapping):
        raise SampleRejected("sample must be a JSON object")
    sample_id = _get(rec, "sample_id", str)
    if not 1 <= len(sample_id) <= MAX_SAMPLE_ID_CHARS or _CONTROL.search(sample_id):
        raise SampleRejected(f"sample_id must be 1-{MAX_SAMPLE_ID_CHARS} printable characters")
    device_id = _get(rec, "device_id", str)
    line_name = _get(rec, "model_line", str)
    if device_id not in devices:
        raise SampleRejected(f"unknown device {device_id[:128]!r}: register it first")
    if line_name not in lines:
        raise SampleRejected(f"unknown model line {line_name[:64]!r}")
    if devices[device_id] != line_name:
        raise SampleRejected(
            f"device {device_id!r} is registered to model line {devices[device_id]!r}, "
            f"not {line_name!r}"
        )
    facts = lines[line_name]
    model_version = _get(rec, "model_version", int)
    if not 0 <= model_version <= MAX_INT32:
        raise SampleRejected("model_version out of range")
    try:
        x = decode_input(_get(rec, "input_b64", str), facts.spec.features)
    except MessageError as exc:
        raise SampleRejected(
            f"{exc} (input_spec shape {list(facts.spec.shape)} from the line's {facts.source})"
        ) from exc
    raw = x.tobytes()  # little-endian float32, as decoded
    if not np.all(np.isfinite(x)):
        raise SampleRejected("input contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if x.size and (lo < facts.spec.min or hi > facts.spec.max):
        raise SampleRejected(
            f"input values must lie in [{facts.spec.min:g}, {facts.spec.max:g}] "
            f"(got [{lo:g}, {hi:g}]; rule from the line's {facts.source})"
        )
    if facts.spec.dtype in _INTEGRAL_DTYPES and not np.array_equal(x, np.round(x)):
        raise SampleRejected(
            f"input values must be whole numbers for dtype {facts.spec.dtype} "
            f"(rule from the line's {facts.source})"
        )
    labels: dict[str, int | None] = {}
    for name in ("true_label", "predicted_label"):
        if name == "true_label" and rec.get(name) is None:  # captured unlabelled: queued
            labels[name] = None
            continue
        value = labels[name] = _get(rec, name, int)
        if not 0 <= value < facts.n_labels:
            raise SampleRejected(
                f"{name} {labels[name]} is not in range(0, {facts.n_labels}): the line has "
                f"{facts.n_labels} labels"
            )
    confidence = _number(rec, "confidence")
    if not 0.0 <= confidence <= 1.0:
        raise SampleRejected(f"confidence {confidence:g} is not in [0, 1]")
    captured_at = _number(rec, "captured_at")
    return {
        "sample_id": sample_id,
        "device_id": device_id,
        "model_line": line_name,
        "model_version": model_version,
        "input": raw,
        "content_sha256": hashlib.sha256(raw).hexdigest(),
        "true_label": labels["true_label"],
        "predicted_label": labels["predicted_label"],
        "confidence": confidence,
        "captured_at": captured_at,
        "received_at": now,
        "origin": ORIGIN_DEVICE if labels["true_label"] is not None else ORIGIN_CAPTURE,
        "label_source": LABEL_DEVICE if labels["true_label"] is not None else None,
        "labelled_at": now if labels["true_label"] is not None else None,
    }


def _facts(session: Session, records: list[Any]) -> tuple[dict[str, str], dict[str, LineFacts]]:
    dev_ids = {
        r["device_id"]
        for r in records
        if isinstance(r, Mapping)
        and isinstance(r.get("device_id"), str)
        and len(r["device_id"]) <= 128
    }
    line_names = {
        r["model_line"]
        for r in records
        if isinstance(r, Mapping)
        and isinstance(r.get("model_line"), str)
        and len(r["model_line"]) <= 64
    }
    devices: dict[str, str] = {}
    if dev_ids:
        for did, line in session.execute(
            select(Device.device_id, Device.model_line).where(Device.device_id.in_(dev_ids))
        ):
            devices[did] = line
    lines: dict[str, LineFacts] = {}
    if line_names:
        released: dict[str, int] = {}
        for ml in session.execute(
            select(
                ModelLine.name, ModelLine.input_spec, ModelLine.labels, ModelLine.current_release
            ).where(ModelLine.name.in_(line_names))
        ):
            lines[ml.name] = LineFacts(ml.name, InputSpec.from_dict(ml.input_spec), len(ml.labels))
            if ml.current_release is not None:
                released[ml.name] = ml.current_release
        if released:
            for rel in session.execute(
                select(Release.line, Release.release, Release.envelope).where(
                    Release.line.in_(released) & Release.release.in_(set(released.values()))
                )
            ):
                if released.get(rel.line) == rel.release:
                    facts = facts_from_release(rel.line, rel.release, rel.envelope)
                    if facts is not None:
                        lines[rel.line] = facts
    return devices, lines


def facts_from_release(line: str, release: int, envelope: Any) -> LineFacts | None:
    """The validation rules in a signed release's manifest (None if the envelope is unusable:
    then the registered spec applies, and the bad row is the rollout engine's to report)."""
    try:
        manifest = Manifest.from_payload(SignedEnvelope.from_dict(envelope).payload)
    except ContractError:
        return None
    return LineFacts(
        line, manifest.input_spec, len(manifest.labels), f"signed release {release} manifest"
    )


def upload_samples(
    session: Session,
    *,
    records: list[Any],
    now: datetime,
    screener: Screener | None = None,
    reads: Session | None = None,
    daily_quota: int = 0,
    default_cooldown_s: float = 0.0,
) -> UploadResult:
    """Validate, screen and store one batch; trigger retraining at the threshold.

    Duplicate sample ids (already stored, or repeated within the batch) are counted, not stored
    twice, so a device may retry an upload safely. New samples are charged to their device's
    ``daily_quota`` (0: none) and screened by ``screener``: quarantined ones are stored but do not
    count toward retraining, and neither do samples of a version older than the one the fleet
    is moving to (:func:`evidence_floor`). ``default_cooldown_s``: seconds after a line's last
    training before a threshold job may start, for lines whose config sets no ``cooldown_s``.

    Screening reads in ``reads`` (a read-only session, see
    ``server.db.engine.make_read_sessionmaker``; None: ``session``, in its write transaction),
    whose transaction ends before the write transaction in ``session`` begins. That one sorts the
    batch again (what a concurrent upload stored meanwhile is a duplicate now, and neither
    counted nor screened twice) and commits the rows with their verdicts.

    Raises:
        RateLimitedError: a device would pass its daily quota (nothing of the batch is stored).
    """
    for attempt in range(_INSERT_RETRIES):
        try:
            return _upload_once(
                session,
                records=records,
                now=now,
                screener=screener,
                reads=reads,
                daily_quota=daily_quota,
                default_cooldown_s=default_cooldown_s,
            )
        except IntegrityError:
            session.rollback()
            if attempt == _INSERT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _sort_batch(
    session: Session, records: list[Any], now: datetime, *, fill_labels: bool = False
) -> _Sorted:
    """Validate ``records`` and sort out what is already stored. Reads only, unless
    ``fill_labels``: then stored unlabelled captures get the labels the batch brings
    (``labelling.fill_device_labels``); without it such rows count as duplicates."""
    rejected: list[dict[str, Any]] = []
    devices, lines = _facts(session, records)
    rows: list[dict[str, Any]] = []
    for rec in records:
        try:
            rows.append(validate_sample(rec, devices=devices, lines=lines, now=now))
        except SampleRejected as exc:
            rejected.append({"sample_id": sample_id_of(rec), "reason": str(exc)})
    rows = labelling.merge_batch(rows)
    ids = {r["sample_id"] for r in rows}
    stored = (
        set(session.scalars(select(Sample.sample_id).where(Sample.sample_id.in_(ids))).all())
        if ids
        else set()
    )
    filled: list[dict[str, Any]] = []
    handled: set[str] = set()
    if fill_labels:
        filled, refused = labelling.fill_device_labels(session, rows=rows, stored=stored, now=now)
        rejected += refused
        handled = {r["sample_id"] for r in (*filled, *refused)}
    # Content already stored for the line, by hash: (line, sha) -> (sample_id, true_label).
    known: dict[tuple[str, str], tuple[str, int | None]] = {}
    hashes = {(r["model_line"], r["content_sha256"]) for r in rows if r["sample_id"] not in stored}
    for line_name in {h[0] for h in hashes}:
        shas = [h[1] for h in hashes if h[0] == line_name]
        for sid, sha, label in session.execute(
            select(Sample.sample_id, Sample.content_sha256, Sample.true_label).where(
                Sample.model_line == line_name, Sample.content_sha256.in_(shas)
            )
        ):
            known.setdefault((line_name, str(sha)), (sid, label))
    fresh: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for row in rows:
        if row["sample_id"] in handled:
            continue
        if row["sample_id"] in stored or row["sample_id"] in fresh:
            duplicates += 1
            continue
        key = (row["model_line"], row["content_sha256"])
        if key in known:
            other, label = known[key]
            reason = (
                f"duplicate content: same input as sample {other!r}"
                if label == row["true_label"]
                else f"conflicting label: same input as sample {other!r}, labelled {label}"
            )
            rejected.append(
                {"sample_id": row["sample_id"], "reason": f"{reason} (sha256 {key[1][:12]})"}
            )
            continue
        known[key] = (row["sample_id"], row["true_label"])
        fresh[row["sample_id"]] = row
    return _Sorted(fresh=fresh, duplicates=duplicates, rejected=rejected, filled=filled)


def _assess(reads: Session, *, records: list[Any], now: datetime, screener: Screener) -> Assessment:
    """Screen the batch's new rows as the stored state stands now, in ``reads``'s own
    transaction, ended here."""
    try:
        pending = _sort_batch(reads, records, now)
        labelled = [r for r in pending.fresh.values() if r["true_label"] is not None]
        return screener.assess(reads, rows=labelled)
    finally:
        reads.rollback()


def _upload_once(
    session: Session,
    *,
    records: list[Any],
    now: datetime,
    screener: Screener | None,
    reads: Session | None,
    daily_quota: int,
    default_cooldown_s: float,
) -> UploadResult:
    # Rows the assessment does not cover are screened in the write transaction (Screener.apply):
    # all of them when there is no read session.
    assessment = Assessment()
    if reads is not None and screener is not None and screener.config.enabled:
        assessment = _assess(reads, records=records, now=now, screener=screener)
    # The write transaction: sorted again, since another upload may have stored some of these
    # rows (or the same content) since the assessment.
    batch = _sort_batch(session, records, now, fill_labels=True)
    result = UploadResult(
        duplicates=batch.duplicates, rejected=batch.rejected, labelled=len(batch.filled)
    )
    fresh = batch.fresh
    per_device: dict[str, int] = {}
    for row in fresh.values():
        per_device[row["device_id"]] = per_device.get(row["device_id"], 0) + 1
    for device_id in sorted(per_device):
        charge_quota(
            session, device_id=device_id, n=per_device[device_id], quota=daily_quota, now=now
        )
    if fresh:
        session.execute(insert(Sample), list(fresh.values()))
    # Unlabelled samples wait in the labelling queue: neither screened nor counted until labelled.
    # Captures labelled by this upload were not assessed: Screener.apply screens them here.
    labelled = [r for r in fresh.values() if r["true_label"] is not None] + batch.filled
    held: dict[str, str] = {}
    if screener is not None and labelled:
        held = screener.apply(session, rows=labelled, assessment=assessment, now=now)
        result.quarantined = [{"sample_id": s, "reason": r} for s, r in sorted(held.items())]
    floors = evidence_floor(session, lines={row["model_line"] for row in labelled})
    per_line: dict[str, int] = {}
    for row in labelled:
        if row["sample_id"] in held:
            continue  # held back from datasets: not a reason to retrain
        if row["model_version"] < floors.get(row["model_line"], 0):
            continue  # stored for datasets, but evidence against a model the fleet is leaving
        per_line[row["model_line"]] = per_line.get(row["model_line"], 0) + 1
    for line_name in sorted(per_line):  # fixed lock order: no deadlock between batches
        job_id = _count_and_trigger(
            session,
            line=line_name,
            added=per_line[line_name],
            now=now,
            default_cooldown_s=default_cooldown_s,
        )
        if job_id is not None:
            result.jobs_triggered.append(job_id)
    session.commit()
    result.accepted = len(fresh)
    return result


def count_labelled(default_cooldown_s: float) -> labelling.CountLabelled:
    """The threshold counter for labels filled later (an operator's import)."""

    def count(session: Session, line: str, added: int, now: datetime) -> int | None:
        return _count_and_trigger(
            session, line=line, added=added, now=now, default_cooldown_s=default_cooldown_s
        )

    return count


def _count_and_trigger(
    session: Session, *, line: str, added: int, now: datetime, default_cooldown_s: float = 0.0
) -> int | None:
    """Add to the line's counter under its row lock; enqueue one job when it crosses the
    threshold and none is queued or running. Within the line's cooldown after its last
    training finished, the job is queued to start when the cooldown ends."""
    counted = session.execute(
        update(ModelLine)
        .where(ModelLine.name == line)
        .values(new_samples=ModelLine.new_samples + added)
        .returning(ModelLine.new_samples, ModelLine.retrain_threshold, ModelLine.training_config)
        .execution_options(synchronize_session=False)
    ).one()
    if counted.new_samples < counted.retrain_threshold:
        return None
    not_before = None
    cooldown_s = cooldown_of(counted.training_config, default_cooldown_s)
    if cooldown_s > 0:
        last = job_queue.last_job_finished_at(session, line=line)
        if last is not None and (now - last).total_seconds() < cooldown_s:
            not_before = last + timedelta(seconds=cooldown_s)
    # None when a job is already queued or running (the partial unique index decides races):
    # that job will pick these samples up, or the next threshold will.
    job = job_queue.add_job(session, line=line, trigger="threshold", now=now, not_before=not_before)
    return job.id if job is not None else None
