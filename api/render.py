"""OpenAI's objects from the services' answers: ``file``, ``batch``, ``list``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lmjobs.jobs.batches import BatchView
from lmjobs.jobs.files import FileInfo


def _ts(t: datetime | None) -> int | None:
    return int(t.timestamp()) if t is not None else None


def file_object(f: FileInfo) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": _ts(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(v: BatchView) -> dict[str, Any]:
    b = v.batch
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "errors": {"object": "list", "data": b.errors_json} if b.errors_json else None,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": _ts(b.created_at),
        "in_progress_at": _ts(b.in_progress_at),
        "expires_at": _ts(b.expires_at),
        "finalizing_at": _ts(b.finalizing_at),
        "completed_at": _ts(b.completed_at),
        "failed_at": _ts(b.failed_at),
        "expired_at": _ts(b.expired_at),
        "cancelling_at": _ts(b.cancelling_at),
        "cancelled_at": _ts(b.cancelled_at),
        "request_counts": {"total": v.total, "completed": v.completed, "failed": v.failed},
        "usage": {
            "input_tokens": v.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": v.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": v.input_tokens + v.output_tokens,
        },
        "metadata": b.metadata_json,
        # lmjobs' own: the job behind the batch, for `lmjobs status`, `query` and `report`
        "lmjobs_job_id": b.job_id,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
