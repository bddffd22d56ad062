"""Sample upload: devices send what their model got wrong (or was unsure of)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.api.deps import DeviceDep, ServicesDep, SessionDep, ViewerDep, read_sessions
from server.api.schemas import SamplesResult, SamplesUpload
from server.core.errors import InvalidRequestError, PayloadTooLargeError
from server.identity.auth import require_same_device
from server.intake.samples import upload_samples
from server.retrain.lineage import sample_lineage

router = APIRouter(prefix="/api/v1/samples", tags=["samples"])


async def _read_capped(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes (not after)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is {declared} bytes, limit {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("", response_model=SamplesResult, response_model_exclude_unset=True)
async def post_samples(request: Request, device: DeviceDep, services: ServicesDep) -> Any:
    settings = services.settings
    raw = await _read_capped(request, settings.max_request_bytes)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"body is not JSON: {exc}") from exc
    try:
        body = SamplesUpload.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(
            'body must be {"samples": [...]} with at least one sample: '
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from exc
    if len(body.samples) > settings.max_samples_per_batch:
        raise PayloadTooLargeError(
            f"{len(body.samples)} samples in one batch, limit {settings.max_samples_per_batch}"
        )
    # A device uploads only its own samples: one foreign record refuses the whole batch (403).
    for record in body.samples:
        if isinstance(record, dict) and "device_id" in record:
            require_same_device(device, record["device_id"])

    def work() -> Any:
        # Screening reads in its own read-only session: on SQLite it then holds no write lock.
        with services.sessions() as session, read_sessions(services)() as reads:
            return upload_samples(
                session,
                records=body.samples,
                now=services.clock(),
                screener=services.screener,
                reads=reads,
                daily_quota=settings.sample_quota_per_device_per_day,
                default_cooldown_s=settings.retrain_cooldown_s,
            )

    # A slot first (waited for, holding no thread; 503 when none comes free), so a batch refused
    # for want of one spends no rate allowance.
    async with services.upload_slots.hold() if services.upload_slots else nullcontext():
        if services.sample_limiter is not None:
            services.sample_limiter.take(device.device_id, len(body.samples))
        result = await run_in_threadpool(work)
    if result.jobs_triggered:
        services.jobs.wake()
    out: dict[str, Any] = {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": result.rejected,
    }
    if result.quarantined:  # listed only when screening held some back
        out["quarantined"] = result.quarantined
    return out


@router.get("/{sample_id}/lineage")
def get_sample_lineage(sample_id: str, _op: ViewerDep, session: SessionDep) -> dict[str, Any]:
    """A sample -> the dataset versions holding it -> the model versions trained on them."""
    return sample_lineage(session, sample_id=sample_id)
