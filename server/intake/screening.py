"""Label screening: keep poisoned samples out of dataset versions, with a reason operators read.

Runs at upload, after the per-sample checks of ``server.intake.samples`` (range, dtype, labels,
exact duplicates, conflicting labels for the same input: those are refused outright and reported
to the device). A sample that passes them is screened here, and stored with its verdict:

* label check: quarantined when its label disagrees with the champion's prediction (the server
  runs the champion ONNX itself; the device's ``predicted_label`` is not trusted) AND fewer than
  ``min_agreement`` of its ``k`` nearest trusted neighbours carry the same label AND at least
  ``min_contradiction`` of those neighbours carry the champion's label: model and data agree with
  each other against the upload. The last bound is what spares honest drifted samples (the
  champion is wrong on them, by definition of a capture, and their clean-data neighbours are
  scattered over several labels): on sklearn's digits with the torchvision drift it holds 2 % of
  honest drifted samples instead of 16 %, and still 95 % of flipped clean labels. Trusted data is
  the line's base data set (sklearn's digits for ``base: digits``, as the training worker stored
  it in the artifact store: ``ModelLine.base_pool_sha256``; the server has no scikit-learn) plus
  the line's latest accepted, unquarantined samples. No champion yet: nothing to disagree with,
  no label check.
* device check: once a device has ``device_min_samples`` samples on the line and more than
  ``device_max_ratio`` of them are quarantined, all its samples not yet in a dataset version are
  quarantined too ("device X: 80% of its labels contradict model and neighbours").

Quarantined samples stay stored (nothing is lost) but ``sample_store.samples_of_line`` skips them,
so no dataset version includes them, and they do not count toward the retraining threshold. An
operator can release one (it then enters the next dataset version).

Screening is split in two so that it holds no write lock (on SQLite, the single writer):
:meth:`Screener.assess` runs the champion and the neighbour search in a read-only transaction
before the upload's write transaction, and :meth:`Screener.apply` writes the verdicts in that
transaction, with the rows, and runs the device check there (a few counts). Rows and verdicts
commit together, so no reader ever sees a stored sample of a batch without its verdict: the
reference set of a concurrent upload holds a batch's unquarantined samples or none of it. An
assessment is keyed by (sample id, line, content, label): a row the write transaction stores
that was not assessed as such (the stored state moved between the two) is screened there.

:func:`label_verdicts` is the pure core; :class:`Screener` is the shell (database, artifact
store, cached ONNX sessions).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from server.core.errors import NotFoundError
from server.db import audit
from server.db.datasets import DatasetSample
from server.db.registry import ModelLine, ModelVersion
from server.db.sample_store import Sample, SampleQuarantine, quarantined_ids
from training.errors import SampleError
from training.samples import load_samples

log = logging.getLogger(__name__)

OUTPUT_NAME = "probabilities"  # contract.manifest.OUTPUT_NAME
_KNN_CHUNK = 256  # query rows per distance matrix (bounds memory: chunk x reference floats)


@dataclass(frozen=True)
class ScreenConfig:
    enabled: bool = True
    k: int = 7  # neighbours consulted
    min_agreement: int = 1  # of k neighbours that must share the label
    min_contradiction: int = 3  # of k neighbours that must carry the champion's label instead
    reference_max: int = 5000  # accepted samples of the line used as neighbours (newest first)
    device_min_samples: int = 20  # samples before the device check applies
    device_max_ratio: float = 0.5  # quarantined fraction above which a device is distrusted


def screen_config(settings: Any) -> ScreenConfig:
    """The screening knobs from the server's Settings."""
    return ScreenConfig(
        enabled=settings.screen_labels,
        k=settings.screen_k,
        min_agreement=settings.screen_min_neighbour_agreement,
        min_contradiction=settings.screen_min_neighbour_contradiction,
        reference_max=settings.screen_reference_max,
        device_min_samples=settings.screen_device_min_samples,
        device_max_ratio=settings.screen_device_max_quarantine_ratio,
    )


@dataclass(frozen=True)
class Verdict:
    sample_id: str
    reason: str


RowKey = tuple[str, str, str, int]  # sample id, model line, content sha256, true label


def row_key(row: Mapping[str, Any]) -> RowKey:
    """What a verdict is about: the same id with other content or another label is another
    sample as far as screening goes."""
    return (row["sample_id"], row["model_line"], row["content_sha256"], int(row["true_label"]))


@dataclass(frozen=True)
class Assessment:
    """What :meth:`Screener.assess` found, to be written by :meth:`Screener.apply`."""

    assessed: frozenset[RowKey] = frozenset()  # rows looked at (whatever the outcome)
    screened_lines: frozenset[str] = frozenset()  # lines with a runnable champion and reference
    verdicts: Mapping[RowKey, str] = field(default_factory=dict)  # label check: row -> reason

    def __or__(self, other: Assessment) -> Assessment:
        return Assessment(
            self.assessed | other.assessed,
            self.screened_lines | other.screened_lines,
            {**self.verdicts, **other.verdicts},
        )


def knn_labels(X: np.ndarray, ref_X: np.ndarray, ref_y: np.ndarray, k: int) -> np.ndarray:
    """The labels of the ``k`` nearest rows of ``ref_X`` for each row of ``X`` (rows x k)."""
    k = min(k, len(ref_X))
    out = np.zeros((len(X), k), dtype=ref_y.dtype)
    ref_sq = (ref_X.astype(np.float64) ** 2).sum(1)
    for start in range(0, len(X), _KNN_CHUNK):
        q = X[start : start + _KNN_CHUNK].astype(np.float64)
        d = (q**2).sum(1)[:, None] - 2.0 * q @ ref_X.T.astype(np.float64) + ref_sq[None, :]
        out[start : start + len(q)] = ref_y[np.argpartition(d, k - 1, axis=1)[:, :k]]
    return out


def label_verdicts(
    sample_ids: Sequence[str],
    X: np.ndarray,
    y: np.ndarray,
    *,
    champion_pred: np.ndarray,
    champion_version: int,
    ref_X: np.ndarray,
    ref_y: np.ndarray,
    config: ScreenConfig,
) -> list[Verdict]:
    """Samples whose label contradicts both the champion and their trusted neighbours."""
    if len(sample_ids) == 0 or len(ref_X) < config.k:
        return []
    near = knn_labels(X, ref_X, ref_y, config.k)
    agree = (near == y[:, None]).sum(1)
    backs_champion = (near == champion_pred[:, None]).sum(1)
    verdicts = []
    for i, sid in enumerate(sample_ids):
        if (
            int(champion_pred[i]) != int(y[i])
            and agree[i] < config.min_agreement
            and backs_champion[i] >= config.min_contradiction
        ):
            verdicts.append(
                Verdict(
                    sid,
                    f"label {int(y[i])} contradicts the champion (v{champion_version} predicts "
                    f"{int(champion_pred[i])}) and its neighbours ({int(agree[i])} of "
                    f"{config.k} nearest trusted samples share it, need {config.min_agreement}; "
                    f"{int(backs_champion[i])} carry {int(champion_pred[i])})",
                )
            )
    return verdicts


class Screener:
    """Screens freshly stored samples of one upload (shell around :func:`label_verdicts`)."""

    def __init__(self, config: ScreenConfig, store: Any) -> None:
        self.config = config
        self.store = store
        self._lock = threading.Lock()
        self._sessions: dict[str, Any] = {}  # champion sha256 -> onnxruntime session
        self._bases: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # base pool sha256 -> X, y

    def _onnx(self, sha256: str) -> Any:
        with self._lock:
            sess = self._sessions.get(sha256)
            if sess is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                sess = ort.InferenceSession(
                    self.store.read_bytes(sha256), opts, providers=["CPUExecutionProvider"]
                )
                self._sessions = {sha256: sess}  # keep only the current champion
            return sess

    def _predict(self, sha256: str, X: np.ndarray) -> np.ndarray:
        sess = self._onnx(sha256)
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in inp.shape[1:]]
        probs = sess.run([OUTPUT_NAME], {inp.name: X.reshape(len(X), *shape)})[0]
        return np.argmax(probs, axis=1)

    def screen(
        self, session: Session, *, rows: list[dict[str, Any]], now: datetime
    ) -> dict[str, str]:
        """Assess and apply in ``session``'s transaction (what an upload does in two steps, see
        :meth:`assess` and :meth:`apply`). Flushes only."""
        return self.apply(session, rows=rows, assessment=self.assess(session, rows=rows), now=now)

    def assess(self, session: Session, *, rows: list[dict[str, Any]]) -> Assessment:
        """The label verdicts on ``rows`` (validated, not necessarily stored). Only reads: run it
        in a read-only session, before the write transaction, so the champion's inference and
        the neighbour search hold no write lock."""
        keys = frozenset(row_key(r) for r in rows)
        if not self.config.enabled or not rows:
            return Assessment(assessed=keys)
        found = Assessment(assessed=keys)
        for line_name in sorted({r["model_line"] for r in rows}):
            line_rows = [r for r in rows if r["model_line"] == line_name]
            found = found | self._assess_line(session, line_name, line_rows)
        return found

    def apply(
        self,
        session: Session,
        *,
        rows: list[dict[str, Any]],
        assessment: Assessment,
        now: datetime,
    ) -> dict[str, str]:
        """Quarantine the label-suspect ``rows`` (inserted in this transaction) as
        ``assessment`` found them, then the pending samples of distrusted devices; returns the
        quarantined ids among ``rows`` -> reason. Rows the assessment did not cover are
        assessed here first. Flushes only."""
        if not self.config.enabled or not rows:
            return {}
        missing = [r for r in rows if row_key(r) not in assessment.assessed]
        if missing:
            assessment = assessment | self.assess(session, rows=missing)
        held: dict[str, str] = {}
        for line_name in sorted({r["model_line"] for r in rows}):
            if line_name not in assessment.screened_lines:
                continue  # no champion to disagree with (or none we can run): no checks
            line_rows = [r for r in rows if r["model_line"] == line_name]
            for row in line_rows:
                reason = assessment.verdicts.get(row_key(row))
                if reason is not None:
                    self._hold(session, row, "label", reason, now)
                    held[row["sample_id"]] = reason
            ids = {r["sample_id"] for r in line_rows}
            for device_id in sorted({r["device_id"] for r in line_rows}):
                for sid, reason in self._device_check(session, line_name, device_id, now).items():
                    if sid in ids:
                        held.setdefault(sid, reason)
        return held

    def _assess_line(
        self, session: Session, line_name: str, rows: list[dict[str, Any]]
    ) -> Assessment:
        line = session.get(ModelLine, line_name)
        if line is None or line.champion_version is None:
            return Assessment()
        champion = session.scalar(
            select(ModelVersion).where(
                ModelVersion.line == line_name, ModelVersion.version == line.champion_version
            )
        )
        if champion is None or not champion.sha256 or not self.store.exists(champion.sha256):
            return Assessment()
        X = np.stack([np.frombuffer(r["input"], dtype="<f4") for r in rows])
        y = np.array([r["true_label"] for r in rows], dtype=np.int64)
        ids = [r["sample_id"] for r in rows]
        try:
            pred = self._predict(champion.sha256, X)
        except Exception as exc:  # a champion we cannot run must not block uploads
            log.warning("screening skipped: champion v%s: %s", champion.version, exc)
            return Assessment()
        ref = self._reference(session, line, X.shape[1], exclude=set(ids))
        if ref is None:
            return Assessment()
        verdicts = label_verdicts(
            ids,
            X,
            y,
            champion_pred=pred,
            champion_version=champion.version,
            ref_X=ref[0],
            ref_y=ref[1],
            config=self.config,
        )
        by_id = {r["sample_id"]: r for r in rows}
        return Assessment(
            screened_lines=frozenset({line_name}),
            verdicts={row_key(by_id[v.sample_id]): v.reason for v in verdicts},
        )

    def _reference(
        self, session: Session, line: ModelLine, features: int, *, exclude: set[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        base = self._base_reference(line, features)
        trusted = session.execute(
            select(Sample.sample_id, Sample.input, Sample.true_label)
            .where(
                Sample.model_line == line.name,
                Sample.true_label.is_not(None),  # the labelling queue is no reference
                Sample.sample_id.not_in(quarantined_ids(line=line.name)),
            )
            .order_by(Sample.received_at.desc())
            .limit(self.config.reference_max + len(exclude))
        ).all()
        trusted = [t for t in trusted if t.sample_id not in exclude][: self.config.reference_max]
        parts_X = [base[0]] if base else []
        parts_y = [base[1]] if base else []
        if trusted:
            parts_X.append(np.stack([np.frombuffer(t.input, dtype="<f4") for t in trusted]))
            parts_y.append(np.array([t.true_label for t in trusted], dtype=np.int64))
        if not parts_X:
            return None
        return np.concatenate(parts_X).astype(np.float32), np.concatenate(parts_y)

    def _base_reference(
        self, line: ModelLine, features: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The line's base pool from the artifact store (None: no worker stored one)."""
        sha = line.base_pool_sha256
        if not sha or not self.store.exists(sha):
            return None
        with self._lock:
            cached = self._bases.get(sha)
        if cached is None:
            try:
                pool = load_samples(self.store.local_path(sha), features)
            except SampleError as exc:
                log.warning("screening without the base pool of %s: %s", line.name, exc)
                return None
            cached = (pool.X, pool.y)
            with self._lock:
                self._bases = {sha: cached}  # keep only the current one
        return cached

    def _device_check(
        self, session: Session, line: str, device_id: str, now: datetime
    ) -> dict[str, str]:
        total = session.scalar(
            select(func.count())
            .select_from(Sample)
            .where(Sample.model_line == line, Sample.device_id == device_id)
        )
        bad = session.scalar(
            select(func.count())
            .select_from(SampleQuarantine)
            .where(
                SampleQuarantine.model_line == line,
                SampleQuarantine.device_id == device_id,
                SampleQuarantine.released_at.is_(None),
            )
        )
        total, bad = int(total or 0), int(bad or 0)
        if total < self.config.device_min_samples or bad <= self.config.device_max_ratio * total:
            return {}
        pending = session.scalars(
            select(Sample.sample_id).where(
                Sample.model_line == line,
                Sample.device_id == device_id,
                Sample.sample_id.not_in(select(SampleQuarantine.sample_id)),
                Sample.sample_id.not_in(select(DatasetSample.sample_id)),
            )
        ).all()
        reason = (
            f"device {device_id}: {round(100 * bad / total)}% of its labels ({bad} of {total}) "
            "contradict model and neighbours; its pending samples are held"
        )
        for sid in pending:
            session.add(
                SampleQuarantine(
                    sample_id=sid,
                    model_line=line,
                    device_id=device_id,
                    check="device",
                    reason=reason,
                    created_at=now,
                )
            )
        if pending:
            audit.record(
                session,
                actor="screening",
                action="sample.quarantine",
                subject=f"device:{device_id}",
                details={"line": line, "check": "device", "count": len(pending), "reason": reason},
                now=now,
            )
        session.flush()
        return dict.fromkeys(pending, reason)

    def _hold(
        self, session: Session, row: dict[str, Any], check: str, reason: str, now: datetime
    ) -> None:
        session.add(
            SampleQuarantine(
                sample_id=row["sample_id"],
                model_line=row["model_line"],
                device_id=row["device_id"],
                check=check,
                reason=reason,
                created_at=now,
            )
        )
        audit.record(
            session,
            actor="screening",
            action="sample.quarantine",
            subject=f"sample:{row['sample_id']}",
            details={"line": row["model_line"], "device": row["device_id"], "reason": reason},
            now=now,
        )
        session.flush()


def list_quarantine(
    session: Session, *, line: str, include_released: bool = False, limit: int = 100
) -> list[dict[str, Any]]:
    """Quarantined samples of ``line``, newest first, with reason, device and time."""
    stmt = select(SampleQuarantine).where(SampleQuarantine.model_line == line)
    if not include_released:
        stmt = stmt.where(SampleQuarantine.released_at.is_(None))
    rows = session.scalars(
        stmt.order_by(SampleQuarantine.created_at.desc(), SampleQuarantine.sample_id).limit(limit)
    )
    return [
        {
            "sample_id": q.sample_id,
            "model_line": q.model_line,
            "device_id": q.device_id,
            "check": q.check,
            "reason": q.reason,
            "created_at": q.created_at.isoformat(),
            "released_at": q.released_at.isoformat() if q.released_at else None,
            "released_by": q.released_by,
        }
        for q in rows
    ]


def release_sample(session: Session, *, sample_id: str, actor: str, now: datetime) -> None:
    """Let a quarantined sample into the next dataset version (audited). Commits.

    Raises:
        NotFoundError: the sample is not in quarantine.
    """
    res = session.execute(
        update(SampleQuarantine)
        .where(SampleQuarantine.sample_id == sample_id, SampleQuarantine.released_at.is_(None))
        .values(released_at=now, released_by=actor)
        .execution_options(synchronize_session=False)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        raise NotFoundError(f"sample {sample_id!r} is not in quarantine")
    audit.record(
        session, actor=actor, action="sample.release", subject=f"sample:{sample_id}", now=now
    )
    session.commit()
