"""Capture of samples worth retraining on, a disk-backed spool, and the uploader thread.

A prediction is remembered (bounded, oldest dropped) until its ground truth arrives through
``feedback``; the sample is then captured if the model was wrong or unsure. Captured samples are
batched into the spool (one JSON file per batch, the exact upload body) and uploaded to the
server. The server is idempotent on ``sample_id``, so re-sending a batch whose response was lost
is safe; a batch file is deleted only after a 2xx, so no sample is lost to a crash or an outage.
Samples still in the open (unsealed) batch, at most ``upload_interval_s`` worth, are the only
ones a power cut can lose.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from contract.messages import SampleRecord, encode_input
from device_agent.config import AgentConfig
from device_agent.errors import UnknownPredictionError
from device_agent.fetcher import backoff_delay
from device_agent.metrics import Metrics
from device_agent.store import atomic_write

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
    dropped: int  # samples dropped because the spool was full
    rejected: int  # samples the server refused (moved to spool/rejected or reported)


@dataclass
class _Batch:
    path: Path
    count: int
    size: int


class Spool:
    """Disk-backed FIFO of sample batches in ``<state_dir>/spool``, bounded by bytes."""

    def __init__(self, directory: Path, *, batch_max: int, max_bytes: int) -> None:
        self.dir = directory
        self.rejected_dir = directory / "rejected"
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self._batch_max = batch_max
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._open: list[dict[str, Any]] = []
        self._batches: list[_Batch] = []
        self._in_flight: Path | None = None
        self.batch_full = threading.Event()  # set when a batch filled up: upload now
        self._counters_path = directory / "counters.json"
        self._counters = {"uploaded": 0, "dropped": 0, "rejected": 0}
        self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self._counters_path.read_text())
            self._counters.update({k: int(saved.get(k, 0)) for k in self._counters})
        except (OSError, ValueError):
            pass
        for path in sorted(self.dir.glob("batch-*.json")):
            try:
                count = len(json.loads(path.read_bytes())["samples"])
            except (OSError, ValueError, KeyError, TypeError):
                log.error("unreadable spool batch %s moved to rejected/", path.name)
                path.replace(self.rejected_dir / path.name)
                continue
            self._batches.append(_Batch(path, count, path.stat().st_size))
        self._seq = 1 + max((int(b.path.stem.split("-")[1]) for b in self._batches), default=0)

    def _save_counters(self) -> None:
        atomic_write(self._counters_path, json.dumps(self._counters).encode())

    def add(self, record: SampleRecord) -> None:
        with self._lock:
            self._open.append(asdict(record))
            full = len(self._open) >= self._batch_max
        if full:
            self.seal()
            self.batch_full.set()

    def seal(self) -> Path | None:
        """Write the open batch as a spool file; enforce the byte bound (drop oldest)."""
        with self._lock:
            if not self._open:
                return None
            samples, self._open = self._open, []
            path = self.dir / f"batch-{self._seq:012d}.json"
            self._seq += 1
            data = json.dumps({"samples": samples}, separators=(",", ":")).encode()
            atomic_write(path, data)
            self._batches.append(_Batch(path, len(samples), len(data)))
            self._enforce_bound()
            return path

    def _enforce_bound(self) -> None:
        """Drop the oldest batches (never the one being uploaded) while over ``max_bytes``."""
        changed = False
        while sum(b.size for b in self._batches) > self._max_bytes:
            victim = next((b for b in self._batches if b.path != self._in_flight), None)
            if victim is None:
                break
            self._batches.remove(victim)
            victim.path.unlink(missing_ok=True)
            self._counters["dropped"] += victim.count
            changed = True
            log.warning("spool full: dropped batch %s (%d samples)", victim.path.name, victim.count)
        if changed:
            self._save_counters()

    def next_batch(self) -> tuple[Path, dict[str, Any], int] | None:
        """The oldest sealed batch (path, upload body, sample count), marked in flight."""
        with self._lock:
            if not self._batches:
                return None
            b = self._batches[0]
            self._in_flight = b.path
        body = json.loads(b.path.read_bytes())
        return b.path, body, b.count

    def _finish(self, path: Path, counter: str, n: int, move_to: Path | None) -> None:
        with self._lock:
            self._in_flight = None
            self._batches = [b for b in self._batches if b.path != path]
            if move_to is None:
                path.unlink(missing_ok=True)
            else:
                path.replace(move_to / path.name)
            self._counters[counter] += n
            self._save_counters()

    def ack(self, path: Path, uploaded: int, rejected: int = 0) -> None:
        """The server acknowledged the batch: delete it."""
        self._finish(path, "uploaded", uploaded, None)
        if rejected:
            with self._lock:
                self._counters["rejected"] += rejected
                self._save_counters()

    def reject(self, path: Path, n: int) -> None:
        """The server refused the whole batch (4xx): keep it aside, never retry it."""
        self._finish(path, "rejected", n, self.rejected_dir)

    def release(self) -> None:
        """The upload failed transiently: the batch stays first in line."""
        with self._lock:
            self._in_flight = None

    def stats(self) -> SpoolStats:
        with self._lock:
            pending = sum(b.count for b in self._batches) + len(self._open)
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
    ) -> None:
        self._cfg = config
        self._spool = spool
        self._metrics = metrics
        self._clock = clock
        self.pending = PendingPredictions(config.pending_labels_max)

    def remember(self, prediction_id: str, item: PendingPrediction) -> None:
        self.pending.add(prediction_id, item)

    def feedback(self, prediction_id: str, true_label: int) -> bool:
        """Record ground truth for a prediction; returns True if the sample was captured.

        Raises:
            UnknownPredictionError: the id was never issued, already labelled, or evicted.
        """
        item = self.pending.pop(prediction_id)
        if item is None:
            raise UnknownPredictionError(f"no pending prediction {prediction_id!r}")
        self._metrics.record_label(item.model_version, item.label == true_label)
        reason = capture_reason(
            item.label,
            true_label,
            item.confidence,
            floor=self._cfg.confidence_floor,
            capture_wrong=self._cfg.capture_wrong,
        )
        if reason is None:
            return False
        self._spool.add(
            SampleRecord(
                sample_id=uuid.uuid4().hex,
                device_id=self._cfg.device_id,
                model_line=self._cfg.model_line,
                model_version=item.model_version,
                input_b64=encode_input(item.x),
                true_label=int(true_label),
                predicted_label=item.label,
                confidence=item.confidence,
                captured_at=self._clock(),
            )
        )
        return True


class Uploader:
    """Drains the spool to ``POST {server_url}/api/v1/samples`` in its own thread."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        spool: Spool,
        client: httpx.Client,
        stop: threading.Event,
    ) -> None:
        self._cfg = config
        self._spool = spool
        self._client = client
        self._stop = stop
        self._failures = 0
        self.rounds = 0  # upload rounds completed by ``run`` (observability, tests)
        self.last_error: str | None = None

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
            except httpx.HTTPError as exc:
                self._spool.release()
                self.last_error = f"sample upload: {type(exc).__name__}: {exc}"
                return False
            code = resp.status_code
            if 200 <= code < 300:
                rejected = self._parse_rejected(resp)
                self._spool.ack(path, count - rejected, rejected)
            elif 400 <= code < 500 and code not in (408, 429):
                log.error("server refused batch %s: HTTP %d %s", path.name, code, resp.text[:200])
                self._spool.reject(path, count)
            else:
                self._spool.release()
                self.last_error = f"sample upload: HTTP {code}"
                return False
        return True

    @staticmethod
    def _parse_rejected(resp: httpx.Response) -> int:
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
                self._failures += 1
        self._spool.seal()  # keep the open batch across the restart
