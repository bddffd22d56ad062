"""Each model version's monitoring reference, read once from its ONNX file, and its thresholds.

The reference travels inside the signed model (``contract.monitoring.METADATA_KEY`` in the ONNX
``metadata_props``), so the server reads it from the very bytes devices run: the artifact store
holds them under the version's ``sha256``. A reference is parsed once per model file and kept,
with its :class:`~server.monitoring.drift.NullCalibrator` (whose thresholds are calibrated per
window size on first use and cached). Reasons a version has none are kept too, except "no such
version" (it may be registered a moment later).

Used by two threads (the ingest writer checks each summary, the evaluator scores windows), so the
caches are guarded by a lock; the slow work (reading and parsing a model) runs outside it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from contract import MessageError
from contract.monitoring import METADATA_KEY, MonitoringReference, MonitorSummary
from server.db.registry import ModelVersion
from server.monitoring._errors import NoReferenceError
from server.monitoring.drift import DEFAULT_ALPHA, NULL_DRAWS, NullCalibrator
from server.release.artifacts import ArtifactStore
from server.release.onnx_meta import onnx_metadata

MAX_CACHED = 256  # model files whose reference (or reason for none) is kept


@dataclass(frozen=True)
class Scoring:
    """A version's reference with the calibrator its windows are scored by."""

    reference: MonitoringReference
    calibrator: NullCalibrator


class ReferenceBook:
    """References and calibrators by model file, read from the artifact store on first use.

    Args:
        store: where the versions' ONNX files are, by sha256.
        alpha, draws, dispersion: the calibrators' (``server.monitoring.drift.NullCalibrator``).
    """

    def __init__(
        self,
        store: ArtifactStore,
        *,
        alpha: float = DEFAULT_ALPHA,
        draws: int = NULL_DRAWS,
        dispersion: float = 1.0,
    ) -> None:
        self.store = store
        self.alpha = alpha
        self.draws = draws
        self.dispersion = dispersion
        self._lock = threading.Lock()
        self._by_sha: dict[str, Scoring | str] = {}  # a reason string: the file has none

    def scoring(self, session: Session, *, line: str, version: int) -> Scoring:
        """The version's reference and calibrator.

        Raises:
            NoReferenceError: no such version, no model file, or no usable reference in it.
        """
        found = session.execute(
            select(ModelVersion.sha256).where(
                ModelVersion.line == line, ModelVersion.version == version
            )
        ).first()
        if found is None:
            raise NoReferenceError(f"model line {line!r} has no version {version}")
        sha = found[0]
        if sha is None:
            raise NoReferenceError(f"{line} v{version} has no model file")
        with self._lock:
            hit = self._by_sha.get(sha)
        if hit is None:
            hit = self._load(sha, f"{line} v{version}")
            with self._lock:
                if len(self._by_sha) >= MAX_CACHED:
                    self._by_sha.pop(next(iter(self._by_sha)))
                hit = self._by_sha.setdefault(sha, hit)
        if isinstance(hit, str):
            raise NoReferenceError(hit)
        return hit

    def reference(self, session: Session, *, line: str, version: int) -> MonitoringReference:
        """The version's reference (see :meth:`scoring`)."""
        return self.scoring(session, line=line, version=version).reference

    def check(self, session: Session, summary: MonitorSummary) -> str | None:
        """Why ``summary`` cannot be scored against its model's reference; None if it can.
        What the ingest writer runs before it stores one."""
        try:
            ref = self.reference(session, line=summary.model_line, version=summary.model_version)
            summary.check_against(ref)
        except (NoReferenceError, MessageError) as exc:
            return str(exc)
        return None

    def _load(self, sha: str, what: str) -> Scoring | str:
        """Read and parse the reference of one model file, or say why it has none."""
        if not self.store.exists(sha):
            return f"{what}: its model file {sha[:12]} is not in the artifact store"
        try:
            raw = onnx_metadata(self.store.read_bytes(sha)).get(METADATA_KEY)
        except Exception as exc:  # noqa: BLE001 - onnx raises its own untyped errors
            return f"{what}: its model file cannot be read ({type(exc).__name__}: {exc})"[:500]
        if raw is None:
            return f"{what}: its model carries no monitoring reference"
        try:
            ref = MonitoringReference.from_json(raw)
            calibrator = NullCalibrator(
                {s.name: s.counts for s in ref.signals},
                alpha=self.alpha,
                draws=self.draws,
                dispersion=self.dispersion,
            )
        except (MessageError, ValueError) as exc:  # MonitoringError is a ValueError
            return f"{what}: its monitoring reference is unusable: {exc}"[:500]
        return Scoring(ref, calibrator)


__all__ = ["MAX_CACHED", "ReferenceBook", "Scoring"]
