"""Alert webhook delivery: the outbox (``webhook_deliveries``) POSTed as JSON, with backoff.

The evaluator queues one delivery per alert transition in the transaction that records it (and
``server.monitoring.acknowledge`` one per acknowledgement, in its own); this sender, on a thread
of its own (never a request thread), POSTs each due one to
``alert_webhook_url``. A 2xx answer delivers it. Anything else (another status, a refused
connection, a timeout) is recorded on the row (``attempts``, ``last_status``, ``last_error``) and
the next attempt is put ``webhook_backoff_s * 2 ** (attempts - 1)`` seconds later, capped at
``webhook_backoff_max_s``; after ``webhook_max_attempts`` the delivery is ``failed`` (kept, with
its last error). Rows live in the database, so a restart resumes pending deliveries.

Before it POSTs, a sender claims the row by moving its ``next_attempt_at`` past the request's
timeout (a guarded UPDATE): two server processes never send one attempt twice, and a sender that
dies mid-POST leaves a row that becomes due again. Delivery is at least once: each POST carries
``X-Edgeloop-Delivery`` (the row id) for receivers to drop duplicates, ``X-Edgeloop-Event``, and,
with ``alert_webhook_secret`` set, ``X-Edgeloop-Signature: sha256=<hex HMAC-SHA256 of the body>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.core.background import Worker
from server.core.config import Settings
from server.db.base import utcnow
from server.db.monitoring import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    WebhookDelivery,
)

log = logging.getLogger(__name__)

BATCH = 50  # deliveries looked at per step
CLAIM_MARGIN_S = 30.0  # seconds beyond the POST timeout a claim holds a row
MAX_ERROR_CHARS = 1000  # characters of the last error kept on a row
MAX_BODY_EXCERPT = 200  # characters of a receiver's error body kept in the error


def backoff_s(attempts: int, *, base_s: float, cap_s: float) -> float:
    """Seconds before the attempt after ``attempts`` failed ones: ``base * 2**(attempts-1)``,
    capped (the exponent stops growing past the cap, so it never overflows)."""
    if base_s <= 0:
        return 0.0
    exponent = 0
    while exponent < attempts - 1 and base_s * 2**exponent < cap_s:
        exponent += 1
    return min(base_s * 2**exponent, cap_s)


class WebhookSender:
    """POSTs due deliveries; ``run_once`` is what the thread calls (tests call it too)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.url = settings.alert_webhook_url
        self.secret = settings.alert_webhook_secret.encode()
        self._client = httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": "edgeloop-server"},
        )
        self.sent = 0
        self.failures = 0
        self._worker = Worker("webhook-sender", self._step, error_wait_s=settings.webhook_tick_s)

    def wake(self) -> None:
        self._worker.wake()

    def run_once(self) -> int:
        """Attempt every due delivery (up to :data:`BATCH`); returns how many were attempted."""
        if not self.url:
            return 0
        now = self.clock()
        with self.sessions() as session:
            due = list(
                session.scalars(
                    select(WebhookDelivery.id)
                    .where(
                        WebhookDelivery.status == DELIVERY_PENDING,
                        WebhookDelivery.next_attempt_at <= now,
                    )
                    .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                    .limit(BATCH)
                )
            )
        attempted = 0
        for delivery_id in due:
            attempted += self._attempt(delivery_id, now)
        return attempted

    def _attempt(self, delivery_id: int, now: datetime) -> int:
        """Claim, POST and record one delivery; 0 if another sender claimed it first."""
        hold = now + timedelta(seconds=self.settings.webhook_timeout_s + CLAIM_MARGIN_S)
        with self.sessions() as session:
            claimed = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == DELIVERY_PENDING,
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(next_attempt_at=hold, attempts=WebhookDelivery.attempts + 1)
                .returning(WebhookDelivery.attempts, WebhookDelivery.event, WebhookDelivery.payload)
                .execution_options(synchronize_session=False)
            ).first()
            session.commit()
        if claimed is None:
            return 0
        attempts, event, payload = claimed
        status, error = self._post(delivery_id, event, payload)
        done = error is None
        # A success keeps the last failure's error: the row tells what the retries were for.
        values: dict[str, object] = {"last_status": status}
        if done:
            values.update(status=DELIVERY_DELIVERED, delivered_at=self.clock())
            self.sent += 1
        else:
            values["last_error"] = error
            self.failures += 1
            if attempts >= self.settings.webhook_max_attempts:
                values["status"] = DELIVERY_FAILED
                log.error(
                    "webhook delivery %s gave up after %d attempts: %s",
                    delivery_id,
                    attempts,
                    error,
                )
            else:
                wait = backoff_s(
                    attempts,
                    base_s=self.settings.webhook_backoff_s,
                    cap_s=self.settings.webhook_backoff_max_s,
                )
                values["next_attempt_at"] = self.clock() + timedelta(seconds=wait)
                log.warning(
                    "webhook delivery %s attempt %d failed (%s); next in %.1f s",
                    delivery_id,
                    attempts,
                    error,
                    wait,
                )
        with self.sessions() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        return 1

    def _post(self, delivery_id: int, event: str, payload: object) -> tuple[int | None, str | None]:
        """One POST: (HTTP status or None, error or None when delivered). Never raises."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Edgeloop-Delivery": str(delivery_id),
            "X-Edgeloop-Event": event,
        }
        if self.secret:
            digest = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            headers["X-Edgeloop-Signature"] = f"sha256={digest}"
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers) as resp:
                if 200 <= resp.status_code < 300:
                    return resp.status_code, None
                head = b""
                for chunk in resp.iter_bytes():  # the receiver's answer, never all of it
                    head += chunk
                    if len(head) >= MAX_BODY_EXCERPT:
                        break
        except Exception as exc:  # noqa: BLE001 - httpx's, or a bad URL: recorded, not raised
            return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        excerpt = head[:MAX_BODY_EXCERPT].decode("utf-8", "replace").replace("\x00", "")
        return resp.status_code, f"HTTP {resp.status_code}: {excerpt}"[:MAX_ERROR_CHARS]

    # ------------------------------------------------------------ thread

    @property
    def running(self) -> bool:
        return self._worker.running

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop(timeout=self.settings.webhook_timeout_s + 10)
        self._client.close()

    def _step(self) -> float:
        return 0.0 if self.run_once() >= BATCH else self.settings.webhook_tick_s


__all__ = ["BATCH", "WebhookSender", "backoff_s"]
