"""Capture of samples worth retraining on, a disk-backed spool, and the uploader thread.

A prediction is remembered (bounded, oldest dropped) until its ground truth arrives through
``feedback``; the sample is then captured if the model was wrong or unsure. An uncertain input
may also be captured at prediction time *without* a label, when the capture policy in force
says so (``capture_policy.PolicyKeeper``: signed, bounded per device); if its ground truth
arrives later, the same sample id is sent again with the label, which fills it on the server.
Captured samples go to a durable spool (see ``Spool``: fsynced journal, sealed by rename,
tombstones for exactly-once) and the uploader sends sealed batches to the server, oldest
first, deleting each after a 2xx.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.messages import SampleRecord, encode_input
from device_agent.capture_policy import PolicyKeeper
from device_agent.config import AgentConfig
from device_agent.errors import ConnectError, TransportError, UnknownPredictionError
from device_agent.faults import crash_point
from device_agent.fetcher import backoff_delay
from device_agent.http import HttpClient, Response
from device_agent.metrics import Metrics
from device_agent.probation import LiveTracker
from device_agent.store import atomic_write, fsync_dir

log = logging.getLogger(__name__)
SAMPLES_PATH = "/api/v1/samples"


def capture_reason(
    predicted: int, true_label: int, confidence: float, *, floor: float, capture_wrong: bool
) -> str | None:
    """Why a labelled prediction is worth uploading, or None if it is not."""
    if capture_wrong and predicted != true_label:
        return "wrong"
    if confidence < floor:
        return "low_confidence"
    return None


@dataclass(frozen=True)
class PendingPrediction:
    x: np.ndarray
    label: int
    confidence: float
    model_version: int
    sha256: str = ""  # the artifact that made the prediction (probation statistics)
    captured_id: str = ""  # sample id it was captured under without a label ("" if not)


class PendingPredictions:
    """Predictions awaiting ground truth; bounded, the oldest is evicted first."""

    def __init__(self, max_items: int) -> None:
        self._max = max_items
        self._items: OrderedDict[str, PendingPrediction] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def add(self, prediction_id: str, item: PendingPrediction) -> None:
        with self._lock:
            self._items[prediction_id] = item
            while len(self._items) > self._max:
                self._items.popitem(last=False)
                self.evicted += 1

    def pop(self, prediction_id: str) -> PendingPrediction | None:
        with self._lock:
            return self._items.pop(prediction_id, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class SpoolStats:
    pending: int  # samples spooled (sealed or open), not yet acknowledged
    uploaded: int  # samples the server acknowledged
    dropped: int  # samples dropped because the spool was full (oldest batch first)
    rejected: int  # samples the server refused (moved to spool/rejected or reported)


@dataclass
class _Batch:
    path: Path
    count: int
    size: int


_JOURNAL = "open.jsonl"


def _read_batch(path: Path) -> list[dict[str, Any]]:
    """Samples of a batch file: JSON lines (current) or ``{"samples": [...]}`` (older agents).
    A torn last line (a write the crash interrupted, never acknowledged) is skipped."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        return list(json.loads(raw)["samples"])
    out = []
    for line in raw.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            log.warning("skipped a torn line in %s", path.name)
    return out


class Spool:
    """Disk-backed FIFO of sample batches in ``<state_dir>/spool``, bounded by bytes.

    Durability: ``add`` appends the sample to the journal ``open.jsonl`` and (with ``fsync``)
    fsyncs it before returning, so a sample acknowledged to the caller survives a power cut.
    ``seal`` turns the journal into a batch by an atomic rename (no copy, so no duplicate).
    Exactly-once: a batch is named in ``counters.json`` (a tombstone, fsynced) before its file
    is deleted after a 2xx or dropped for space; a batch whose tombstone exists is deleted at
    start, never sent again. Only a crash between the server's commit and the 2xx reaching us
    can resend a batch, and the server stores each ``sample_id`` once.
    Bound: when journal + sealed batches exceed ``max_bytes``, the oldest sealed batches are
    dropped (newest data reflects the current drift best) and counted in ``dropped``.
    """

    def __init__(
        self, directory: Path, *, batch_max: int, max_bytes: int, fsync: bool = True
    ) -> None:
        self.dir = directory
        self.rejected_dir = directory / "rejected"
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self._batch_max = batch_max
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._journal_path = directory / _JOURNAL
        self._journal: Any = None  # open binary file, append mode
        self._open_count = 0
        self._open_bytes = 0
        self._batches: list[_Batch] = []
        self._in_flight: Path | None = None
        self.batch_full = threading.Event()  # set when a batch filled up: upload now
        self._counters_path = directory / "counters.json"
        self._counters: dict[str, int] = {"uploaded": 0, "dropped": 0, "rejected": 0}
        self._tombstones: list[str] = []
        self._saved_seq = 1
        self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self._counters_path.read_text())
            self._counters.update({k: int(saved.get(k, 0)) for k in self._counters})
            self._tombstones = [str(n) for n in saved.get("tombstones", [])]
            self._saved_seq = int(saved.get("seq", 1))
        except (OSError, ValueError):
            pass
        for name in self._tombstones:  # acknowledged or dropped before a crash: gone for good
            (self.dir / name).unlink(missing_ok=True)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        paths = sorted(self.dir.glob("batch-*.json*"), key=lambda p: p.stem.split(".")[0])
        # Batch names are never reused (a reused name could match an old tombstone).
        self._seq = max(self._saved_seq, 1 + max((int(p.name[6:18]) for p in paths), default=0))
        if self._journal_path.exists():  # samples acknowledged before the crash: seal them
            samples = _read_batch(self._journal_path)
            if samples:
                dest = self.dir / f"batch-{self._seq:012d}.jsonl"
                self._seq += 1
                atomic_write(dest, b"".join(self._line(s) for s in samples))
                paths.append(dest)
            self._journal_path.unlink()
            fsync_dir(self.dir)
        for path in paths:
            try:
                count = len(_read_batch(path))
            except (OSError, ValueError, KeyError, TypeError):
                log.error("unreadable spool batch %s moved to rejected/", path.name)
                path.replace(self.rejected_dir / path.name)
                continue
            self._batches.append(_Batch(path, count, path.stat().st_size))

    @staticmethod
    def _line(sample: dict[str, Any]) -> bytes:
        return json.dumps(sample, separators=(",", ":")).encode() + b"\n"

    def _save_counters(self, tombstone: str | None = None) -> None:
        live = {b.path.name for b in self._batches}
        self._tombstones = [t for t in self._tombstones if t not in live][-50:]
        if tombstone is not None:
            self._tombstones.append(tombstone)
        data = {**self._counters, "tombstones": self._tombstones, "seq": self._seq}
        atomic_write(self._counters_path, json.dumps(data).encode())

    def add(self, record: SampleRecord) -> None:
        """Append one sample durably (see class docstring); seal when the batch is full."""
        line = self._line(asdict(record))
        with self._lock:
            if self._journal is None:
                self._journal = open(self._journal_path, "ab")  # noqa: SIM115 - kept open
                fsync_dir(self.dir)
            self._journal.write(line)
            self._journal.flush()
            if self._fsync:
                os.fsync(self._journal.fileno())
            self._open_count += 1
            self._open_bytes += len(line)
            full = self._open_count >= self._batch_max
        crash_point("spool:appended")
        if full:
            self.seal()
            self.batch_full.set()

    def seal(self) -> Path | None:
        """Turn the journal into a sealed batch (atomic rename); enforce the byte bound."""
        with self._lock:
            if self._journal is None or not self._open_count:
                return None
            self._journal.close()
            self._journal = None
            path = self.dir / f"batch-{self._seq:012d}.jsonl"
            self._seq += 1
            os.replace(self._journal_path, path)
            fsync_dir(self.dir)
            self._batches.append(_Batch(path, self._open_count, self._open_bytes))
            self._open_count = self._open_bytes = 0
            self._enforce_bound()
            return path

    def close(self) -> None:
        """Seal what is open and close the journal (agent stop)."""
        self.seal()
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def _enforce_bound(self) -> None:
        """Drop the oldest batches (never the one being uploaded) while over ``max_bytes``."""
        while sum(b.size for b in self._batches) + self._open_bytes > self._max_bytes:
            victim = next((b for b in self._batches if b.path != self._in_flight), None)
            if victim is None:
                break
            self._batches.remove(victim)
            self._counters["dropped"] += victim.count
            self._save_counters(tombstone=victim.path.name)
            victim.path.unlink(missing_ok=True)
            log.warning("spool full: dropped batch %s (%d samples)", victim.path.name, victim.count)

    def next_batch(self) -> tuple[Path, dict[str, Any], int] | None:
        """The oldest sealed batch (path, upload body, sample count), marked in flight."""
        with self._lock:
            if not self._batches:
                return None
            b = self._batches[0]
            self._in_flight = b.path
        return b.path, {"samples": _read_batch(b.path)}, b.count

    def _finish(self, path: Path, counter: str, n: int, move_to: Path | None) -> None:
        with self._lock:
            self._in_flight = None
            self._batches = [b for b in self._batches if b.path != path]
            self._counters[counter] += n
            if move_to is None:
                self._save_counters(tombstone=path.name)  # durable before the file goes
                path.unlink(missing_ok=True)
            else:
                path.replace(move_to / path.name)
                self._save_counters()

    def ack(self, path: Path, uploaded: int, rejected: int = 0) -> None:
        """The server acknowledged the batch: count it, tombstone it, delete it."""
        with self._lock:
            self._counters["rejected"] += rejected
        self._finish(path, "uploaded", uploaded, None)

    def reject(self, path: Path, n: int) -> None:
        """The server refused the whole batch (4xx): keep it aside, never retry it."""
        self._finish(path, "rejected", n, self.rejected_dir)

    def release(self) -> None:
        """The upload failed transiently: the batch stays first in line."""
        with self._lock:
            self._in_flight = None

    def stats(self) -> SpoolStats:
        with self._lock:
            pending = sum(b.count for b in self._batches) + self._open_count
            return SpoolStats(pending=pending, **self._counters)


class Capture:
    """Remembers predictions, decides on feedback whether to capture, and feeds the spool."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        spool: Spool,
        metrics: Metrics,
        clock: Callable[[], float],
        live: LiveTracker | None = None,
        policy: PolicyKeeper | None = None,
    ) -> None:
        self._cfg = config
        self._spool = spool
        self._metrics = metrics
        self._clock = clock
        self._live = live
        self._policy = policy
        self.pending = PendingPredictions(config.pending_labels_max)
        self.unlabelled = 0  # inputs captured without a label (capture policy)
        self.labels_filled = 0  # of those, labelled later by feedback

    def remember(self, prediction_id: str, item: PendingPrediction) -> None:
        self.pending.add(prediction_id, item)

    def capture_uncertain(
        self, x: np.ndarray, *, label: int, confidence: float, model_version: int
    ) -> str:
        """Capture ``x`` without a label if the capture policy in force says so (bounded per
        device); returns the sample id it was spooled under, or "" when not captured."""
        if self._policy is None or not self._policy.should_capture(confidence):
            return ""
        sample_id = uuid.uuid4().hex
        self._spool.add(
            SampleRecord(
                sample_id=sample_id,
                device_id=self._cfg.device_id,
                model_line=self._cfg.model_line,
                model_version=model_version,
                input_b64=encode_input(x),
                true_label=None,
                predicted_label=int(label),
                confidence=float(confidence),
                captured_at=self._clock(),
            )
        )
        self.unlabelled += 1
        return sample_id

    def feedback(self, prediction_id: str, true_label: int) -> bool:
        """Record ground truth for a prediction; returns True if the sample was captured.

        Raises:
            UnknownPredictionError: the id was never issued, already labelled, or evicted.
        """
        item = self.pending.pop(prediction_id)
        if item is None:
            raise UnknownPredictionError(f"no pending prediction {prediction_id!r}")
        self._metrics.record_label(
            item.model_version,
            item.label == true_label,
            true_label=true_label,
            predicted_label=item.label,
        )
        if self._live is not None and item.sha256:
            self._live.record_label(item.sha256, item.label == true_label)
        if item.captured_id:  # captured unlabelled: send its label under the same sample id
            self._spool.add(self._record(item, item.captured_id, true_label))
            self.labels_filled += 1
            return True
        reason = capture_reason(
            item.label,
            true_label,
            item.confidence,
            floor=self._cfg.confidence_floor,
            capture_wrong=self._cfg.capture_wrong,
        )
        if reason is None:
            return False
        self._spool.add(self._record(item, uuid.uuid4().hex, true_label))
        return True

    def _record(self, item: PendingPrediction, sample_id: str, true_label: int) -> SampleRecord:
        return SampleRecord(
            sample_id=sample_id,
            device_id=self._cfg.device_id,
            model_line=self._cfg.model_line,
            model_version=item.model_version,
            input_b64=encode_input(item.x),
            true_label=int(true_label),
            predicted_label=item.label,
            confidence=item.confidence,
            captured_at=self._clock(),
        )


class Uploader:
    """Drains the spool to ``POST {server_url}/api/v1/samples`` in its own thread."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        spool: Spool,
        client: HttpClient,
        stop: threading.Event,
    ) -> None:
        self._cfg = config
        self._spool = spool
        self._client = client
        self._stop = stop
        self._failures = 0
        self.rounds = 0  # upload rounds completed by ``run`` (observability, tests)
        self.sent = 0  # samples put on the wire (every attempt, including resends)
        self.server_duplicates = 0  # samples the server said it already stored
        self.last_error: str | None = None
        self.retry_after_s = 0.0  # a 429's Retry-After: the next attempt waits at least this

    def upload_once(self) -> bool:
        """Seal the open batch and upload sealed batches oldest first until the spool is empty.

        Returns:
            False if an upload failed transiently (the caller backs off), else True.
        """
        self._spool.seal()
        while not self._stop.is_set():
            nxt = self._spool.next_batch()
            if nxt is None:
                return True
            path, body, count = nxt
            try:
                resp = self._client.post(self._cfg.server_url + SAMPLES_PATH, json=body)
            except ConnectError as exc:  # nothing left this device
                self._spool.release()
                self.last_error = f"sample upload: {type(exc).__name__}: {exc}"
                return False
            except TransportError as exc:  # the request may have reached the server
                self.sent += count
                self._spool.release()
                self.last_error = f"sample upload: {type(exc).__name__}: {exc}"
                return False
            self.sent += count
            code = resp.status_code
            if 200 <= code < 300:
                rejected = self._parse_rejected(resp)
                self.server_duplicates += self._parse_duplicates(resp)
                self._spool.ack(path, count - rejected, rejected)
            elif code in (401, 403):
                # Our identity was refused (not enrolled yet, or revoked): the samples are not
                # at fault, so keep them on disk and back off instead of dropping them.
                self._spool.release()
                self.last_error = f"sample upload refused: HTTP {code} {resp.text[:200]}"
                log.error("%s", self.last_error)
                return False
            elif 400 <= code < 500 and code not in (408, 429):
                log.error("server refused batch %s: HTTP %d %s", path.name, code, resp.text[:200])
                self._spool.reject(path, count)
            else:
                self._spool.release()
                self.last_error = f"sample upload: HTTP {code}"
                if code == 429:  # over the server's rate limit or quota: keep the batch, wait
                    self.retry_after_s = _retry_after_s(resp)
                    self.last_error += f" {resp.text[:200]}"
                return False
        return True

    @staticmethod
    def _parse_duplicates(resp: Response) -> int:
        try:
            return int(resp.json().get("duplicates") or 0)
        except (ValueError, AttributeError, TypeError):
            return 0

    @staticmethod
    def _parse_rejected(resp: Response) -> int:
        try:
            rejected = resp.json().get("rejected") or []
        except (ValueError, AttributeError):
            return 0
        for r in rejected[:20]:
            log.warning("server rejected sample %s: %s", r.get("sample_id"), r.get("reason"))
        return len(rejected)

    def run(self) -> None:
        """Thread body: upload every interval (or when a batch fills), back off on failure."""
        delay = self._cfg.upload_interval_s
        while not self._stop.is_set():
            self._spool.batch_full.wait(delay)
            self._spool.batch_full.clear()
            if self._stop.is_set():
                break
            try:
                ok = self.upload_once()
            except Exception:  # never let the thread die: the spool is durable
                log.exception("uploader error")
                ok = False
            self.rounds += 1
            if ok:
                self._failures = 0
                delay = self._cfg.upload_interval_s
            else:
                delay = backoff_delay(
                    self._failures, self._cfg.upload_interval_s, self._cfg.upload_backoff_cap_s
                )
                delay = max(delay, min(self.retry_after_s, self._cfg.upload_backoff_cap_s))
                self.retry_after_s = 0.0
                self._failures += 1
        self._spool.seal()  # keep the open batch across the restart


def _retry_after_s(resp: Response) -> float:
    """Seconds from a Retry-After header (delta-seconds form); 0 when absent or unusable."""
    try:
        return max(0.0, float(resp.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0
