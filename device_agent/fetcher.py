"""Artifact download: a small abstract fetcher and its HTTP implementation.

The fetcher only moves bytes into ``downloads/<sha>.part``; trust is decided by the updater, which
checks the signed size and sha256 before anything is activated. Limits are enforced while
streaming: the fetcher never writes a byte beyond ``expected_size`` and stops reading at the first
chunk that would cross it.
"""

from __future__ import annotations

import abc
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from device_agent.config import AgentConfig
from device_agent.errors import LengthError, RedirectError, SlowRetrievalError, TransportError
from device_agent.faults import crash_point
from device_agent.http import HttpClient, StreamResponse, parse_length

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,40})-([0-9]{1,40})/([0-9]{1,40}|\*)")


def backoff_delay(
    attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped (seconds)."""
    # 2.0 ** attempt overflows a float past attempt 1023 (a device retrying for days): the
    # exponent stops growing once the cap is reached anyway.
    ceiling = min(cap_s, base_s * (2.0 ** min(max(attempt, 0), 64)))
    r = (rng or random).random()
    return ceiling / 2 + r * ceiling / 2


class Fetcher(abc.ABC):
    """Moves the bytes at ``url`` into ``dest``, resuming from what ``dest`` already holds."""

    @abc.abstractmethod
    def fetch(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Complete ``dest`` to exactly ``expected_size`` bytes.

        Raises:
            LengthError: the source offers more bytes than ``expected_size`` or the cap.
            TransportError: the download failed after all retries (``dest`` is kept for resume).
        """


class HttpFetcher(Fetcher):
    """Resumable, bounded HTTP downloads with retries."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        client: HttpClient | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._cfg = config
        self._own_client = client is None
        self._client = client or HttpClient.from_config(config)
        self._stop = stop or threading.Event()

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def fetch(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if expected_size > self._cfg.max_artifact_bytes:
            raise LengthError(
                f"artifact of {expected_size} bytes exceeds the cap of "
                f"{self._cfg.max_artifact_bytes} bytes"
            )
        attempts = self._cfg.download_retries + 1
        for attempt in range(attempts):
            try:
                self._fetch_once(url, dest, expected_size, progress)
                return
            except TransportError as exc:
                if attempt + 1 >= attempts or isinstance(exc, RedirectError):
                    raise  # a refused redirect: the same URL redirects the same way
                delay = backoff_delay(attempt, self._cfg.backoff_base_s, self._cfg.backoff_cap_s)
                log.warning(
                    "download failed, retrying",
                    extra={
                        "url": url,
                        "attempt": attempt + 1,
                        "delay_s": round(delay, 3),
                        "error": str(exc),
                    },
                )
                if self._stop.wait(delay):
                    raise TransportError("download interrupted: agent stopping") from exc

    def _fetch_once(
        self, url: str, dest: Path, expected: int, progress: Callable[[int], None] | None
    ) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        if have > expected:
            dest.unlink()
            have = 0
        if have == expected:
            return  # complete from an earlier attempt; the updater checks the hash
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        with self._client.stream("GET", url, headers=headers) as resp:
            mode = self._check_response(resp, dest, have)
            if mode == "wb":
                have = 0
            total = self._announced_size(resp, have)
            if total is not None and total != expected:
                # A complete file of another size is wrong content, not a bad transfer.
                dest.unlink(missing_ok=True)
                raise LengthError(
                    f"artifact size announced by the server is {total} bytes, "
                    f"the signed size is {expected} bytes"
                )
            self._stream(resp, dest, mode, have, expected, progress)
        got = dest.stat().st_size if dest.exists() else 0
        if got < expected:
            raise TransportError(f"GET {url}: body ended after {got} of {expected} bytes")

    @staticmethod
    def _announced_size(resp: StreamResponse, have: int) -> int | None:
        """Full artifact size the response claims (Content-Range total or Content-Length)."""
        if resp.status_code == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range") or "")
            total = parse_length(m.group(3)) if m else None
            if total is not None:
                return total
        declared = parse_length(resp.headers.get("Content-Length"))
        if declared is not None:
            return declared + (have if resp.status_code == 206 else 0)
        return None

    @staticmethod
    def _check_response(resp: StreamResponse, dest: Path, have: int) -> str:
        """Decide how to write the body: append (resume) or start over. Returns a file mode."""
        if resp.status_code == 206 and have:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range") or "")
            start = parse_length(m.group(1)) if m else None
            if start == have:
                return "ab"
            if start == 0:
                return "wb"
            dest.unlink(missing_ok=True)  # inconsistent range: next attempt starts afresh
            raise TransportError(
                f"Content-Range {(resp.headers.get('Content-Range') or '')[:100]!r} != {have}"
            )
        if resp.status_code in (200, 206):
            return "wb"  # the server ignored Range (200): full body follows
        if resp.status_code == 416:
            dest.unlink(missing_ok=True)
        raise TransportError(f"GET {resp.url}: HTTP {resp.status_code}")

    def _stream(
        self,
        resp: StreamResponse,
        dest: Path,
        mode: str,
        have: int,
        expected: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        written = have
        dest.parent.mkdir(parents=True, exist_ok=True)
        window_s = self._cfg.slow_retrieval_window_s
        min_bytes = self._cfg.min_download_bps * window_s
        window_start, window_bytes = time.monotonic(), 0
        with open(dest, mode) as fh:
            for chunk in resp.iter_bytes(self._cfg.download_chunk_bytes):
                if self._stop.is_set():
                    raise TransportError("download interrupted: agent stopping")
                # Slow-retrieval defence: a minimum average rate over each window. The bytes
                # written so far stay in the .part file, so the retry resumes from them.
                now = time.monotonic()
                window_bytes += len(chunk)
                if now - window_start >= window_s:
                    if window_bytes < min_bytes:
                        raise SlowRetrievalError(
                            f"{window_bytes} bytes in {now - window_start:.1f} s, below the "
                            f"minimum of {self._cfg.min_download_bps} bytes/s"
                        )
                    window_start, window_bytes = now, 0
                if written + len(chunk) > expected:
                    # Endless-data defence: stop at the first chunk crossing the signed size,
                    # write none of it, and drop the partial file from a misbehaving source.
                    fh.close()
                    dest.unlink(missing_ok=True)
                    raise LengthError(f"server sent more than the signed size of {expected} bytes")
                fh.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
                crash_point("download:chunk")
            fh.flush()
            os.fsync(fh.fileno())
