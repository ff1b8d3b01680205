"""OpenAI batches: each one an lmjobs job, with OpenAI's statuses, files and counts.

``validating`` (the input read into a job, in the create request) → ``in_progress`` (the job
runs) → ``finalizing`` (output and error files written) → ``completed``; ``failed`` when no
line is valid or the job stops on an engine fault; ``cancelling`` → ``cancelled``; ``expired``
past ``expires_at`` (the job's ``finish_by``, so dispatch stops there), its finished rows kept.
A cancelled or expired batch finalizes once no chunk of its job is running, so the rows
being generated at that moment are kept too.

The job does the work; a batch follows it in :func:`refresh_batch`, called when a batch is
read and by the server's refresher. Every transition is one conditional UPDATE, so two
servers refreshing the same batch make it once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update

from lmjobs.db.models import Batch, BatchStatus, Chunk, ChunkStatus, Job, JobStatus, Reject, utcnow
from lmjobs.db.session import Database, rows_changed
from lmjobs.jobs.api_errors import BatchStateError, InvalidRequestError, NoSuchObjectError
from lmjobs.jobs.batch_input import LineProblem, check_metadata, fix_reasons, parse_window, prepare_input
from lmjobs.jobs.batch_output import output_lines
from lmjobs.jobs.control import job_progress
from lmjobs.jobs.dispatch import Publisher
from lmjobs.jobs.errors import InputFileError, JobStateError
from lmjobs.jobs.files import file_path, files_folder, new_id, owned_file, record_output
from lmjobs.jobs.inputs import OPENAI_URLS
from lmjobs.jobs.lifecycle import cancel_job
from lmjobs.jobs.params import job_params
from lmjobs.jobs.settings import Settings
from lmjobs.jobs.submit import make_options, submit_file

ENDPOINTS = tuple(OPENAI_URLS)
MAX_ERRORS = 1000  # rejected lines listed in a batch's errors; `lmjobs rejects` has them all
STUCK_FINALIZING = timedelta(minutes=10)  # a finalize whose process died is taken over then


@dataclass
class BatchView:
    batch: Batch
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def create_batch(
    db: Database,
    settings: Settings,
    publish: Publisher | None,
    *,
    key_id: int,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Any = None,
) -> BatchView:
    """Read the key's uploaded file into a job (the same validation as ``lmjobs submit``) and
    dispatch it. A file with no valid line makes a ``failed`` batch listing its errors."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequestError(
            f"endpoint {endpoint!r:.60} is not supported; use {' or '.join(ENDPOINTS)}",
            param="endpoint",
            code="invalid_value",
        )
    window = parse_window(completion_window)
    meta = check_metadata(metadata)
    src = owned_file(db, key_id, input_file_id)
    file_path(db, settings, key_id, input_file_id)  # its content is there
    if src.purpose != "batch":
        raise InvalidRequestError(
            f"file {input_file_id} has purpose {src.purpose!r}, not 'batch'", param="input_file_id"
        )
    now = utcnow()
    batch = Batch(
        id=new_id("batch_"),
        api_key_id=key_id,
        status=BatchStatus.VALIDATING.value,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        metadata_json=meta,
        created_at=now,
        expires_at=now + window,
    )
    with db.session() as s:
        s.add(batch)
    try:
        _validate(db, settings, publish, batch, src.storage_name)
    except Exception:  # no batch stays `validating` forever: it failed, and the caller hears why
        with contextlib.suppress(Exception):
            _fail(db, batch.id, [{"code": "server_error", "message": "validation stopped", "param": None}])
        raise
    return get_batch(db, settings, key_id, batch.id)


def _validate(db: Database, settings: Settings, publish: Publisher | None, batch: Batch, stored: str) -> None:
    """validating → in_progress (the job made and dispatched) or failed (no valid line)."""
    folder = files_folder(settings)
    prep = prepare_input(
        settings, folder / stored, endpoint=batch.endpoint, copy_path=folder / f"{batch.id}.input"
    )
    if prep.model is None:
        problems = sorted([*prep.line_errors, *prep.refused.values()], key=lambda p: p.line)
        _fail(db, batch.id, [_error(p) for p in problems[:MAX_ERRORS]] or [_no_lines()])
        return
    opts = make_options(
        settings,
        task="chat",
        model=prep.model,
        params=job_params(),
        name=batch.id,
        finish_by=batch.expires_at,
    )
    try:
        outcome = submit_file(db, prep.path, opts, publish=publish, allow_repeat=True)
    except InputFileError as exc:
        _fail(db, batch.id, [{"code": "invalid_file", "message": str(exc), "param": None, "line": None}])
        return
    job_id = outcome.report.job_id
    fix_reasons(db, job_id, prep.refused)
    with db.session() as s:
        rejects = s.scalars(
            select(Reject).where(Reject.job_id == job_id).order_by(Reject.line_number).limit(MAX_ERRORS)
        )
        errors: list[dict[str, Any]] = []
        for r in rejects:
            refused = prep.refused.get(r.line_number)
            errors.append(
                _error(refused)
                if refused is not None
                else {"code": "invalid_request", "message": r.reason, "param": None, "line": r.line_number}
            )
        s.execute(
            update(Batch)
            .where(Batch.id == batch.id)
            .values(
                job_id=job_id,
                model=prep.requested,
                status=BatchStatus.IN_PROGRESS.value,
                in_progress_at=utcnow(),
                errors_json=errors or None,
            )
        )


def _error(p: LineProblem) -> dict[str, Any]:
    return {"code": p.code, "message": p.message, "param": p.param, "line": p.line}


def _no_lines() -> dict[str, Any]:
    return {"code": "empty_file", "message": "the input file has no lines", "param": None, "line": None}


def _fail(db: Database, batch_id: str, errors: list[dict[str, Any]]) -> None:
    with db.session() as s:
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(status=BatchStatus.FAILED.value, failed_at=utcnow(), errors_json=errors)
        )


def _running_chunks(db: Database, job_id: int, now: datetime) -> int:
    with db.session() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(Chunk)
                .where(
                    Chunk.job_id == job_id,
                    Chunk.status == ChunkStatus.RUNNING.value,
                    Chunk.lease_expires_at > now,
                )
            )
            or 0
        )


def _stop_job(db: Database, job_id: int) -> None:
    try:
        cancel_job(db, job_id)
    except JobStateError:  # finished meanwhile: nothing left to stop
        pass


def refresh_batch(db: Database, settings: Settings, batch_id: str) -> None:
    """Move the batch on from what its job did: expiry, the end of cancelling, finalizing."""
    now = utcnow()
    with db.session() as s:
        b = s.get(Batch, batch_id)
        job = s.get(Job, b.job_id) if b is not None and b.job_id is not None else None
    if b is None or b.status not in BatchStatus.open() or b.status == BatchStatus.VALIDATING.value:
        return
    if job is None:  # the job was deleted under it
        _fail(db, batch_id, [{"code": "job_deleted", "message": "the batch's job is gone", "param": None}])
        return
    if b.status == BatchStatus.FINALIZING.value:
        if b.finalizing_at is not None and b.finalizing_at < now - STUCK_FINALIZING:
            _finalize(db, settings, b, job, taking_over=True)
        return
    finished = JobStatus(job.status).is_finished
    if b.status == BatchStatus.IN_PROGRESS.value and not finished and now >= b.expires_at:
        with db.session() as s:
            s.execute(
                update(Batch).where(Batch.id == batch_id, Batch.expired_at.is_(None)).values(expired_at=now)
            )
        _stop_job(db, job.id)
        b.expired_at = b.expired_at or now
        finished = True
    stopping = (
        b.status == BatchStatus.CANCELLING.value
        or b.expired_at is not None
        or job.status == JobStatus.CANCELLED.value
    )
    if stopping and not JobStatus(job.status).is_finished:
        _stop_job(db, job.id)
    if not finished and not stopping:
        return
    if stopping and _running_chunks(db, job.id, now):
        return  # the rows being generated now are kept: finalize after them
    _finalize(db, settings, b, job, taking_over=False)


def _finalize(db: Database, settings: Settings, b: Batch, job: Job, *, taking_over: bool) -> None:
    now = utcnow()
    start = (
        [BatchStatus.FINALIZING.value]
        if taking_over
        else [BatchStatus.IN_PROGRESS.value, BatchStatus.CANCELLING.value]
    )
    with db.session() as s:
        won = s.execute(
            update(Batch)
            .where(Batch.id == b.id, Batch.status.in_(start), Batch.status == b.status)
            .values(status=BatchStatus.FINALIZING.value, finalizing_at=now)
        )
        if rows_changed(won) != 1:
            return
        job = s.get(Job, job.id) or job
    errors = list(b.errors_json or [])
    stamps: dict[str, Any] = {}
    if b.cancelling_at is not None or (b.status == BatchStatus.CANCELLING.value):
        target, code = BatchStatus.CANCELLED, "batch_cancelled"
    elif b.expired_at is not None:
        target, code = BatchStatus.EXPIRED, "batch_expired"
    elif job.error is not None:
        target, code = BatchStatus.FAILED, "batch_failed"
        errors.append({"code": "engine_fault", "message": job.error, "param": None, "line": None})
    elif job.status == JobStatus.CANCELLED.value:  # `lmjobs cancel` on the job
        target, code = BatchStatus.CANCELLED, "batch_cancelled"
    else:
        target, code = BatchStatus.COMPLETED, "batch_incomplete"
    files = {}
    for ok, column in ((True, "output_file_id"), (False, "error_file_id")):
        lines = (
            line
            for good, line in output_lines(
                db, job.id, endpoint=b.endpoint, model=job.model, unfinished_code=code
            )
            if good is ok
        )
        info = record_output(
            db,
            settings,
            key_id=b.api_key_id,
            filename=f"{b.id}_{'output' if ok else 'error'}.jsonl",
            lines=lines,
        )
        files[column] = info.id if info else None
    stamp = {
        BatchStatus.CANCELLED: "cancelled_at",
        BatchStatus.EXPIRED: "expired_at",
        BatchStatus.FAILED: "failed_at",
        BatchStatus.COMPLETED: "completed_at",
    }[target]
    stamps[stamp] = b.expired_at if target == BatchStatus.EXPIRED and b.expired_at else utcnow()
    with db.session() as s:
        s.execute(
            update(Batch)
            .where(Batch.id == b.id, Batch.status == BatchStatus.FINALIZING.value)
            .values(status=target.value, errors_json=errors or None, **files, **stamps)
        )


def _view(db: Database, b: Batch) -> BatchView:
    v = BatchView(batch=b)
    if b.job_id is None:
        return v
    with db.session() as s:
        job = s.get(Job, b.job_id)
        v.total = job.requests_total if job else 0
        # counts and tokens summed over the job's chunks (jobs/control.py, job_progress); a
        # prompt counts once, however many samples it was asked for (OpenAI's usage)
        progress = job_progress(s, [b.job_id])[b.job_id]
    v.completed, v.failed = progress.succeeded, progress.failed
    v.input_tokens, v.output_tokens = progress.input_tokens, progress.output_tokens
    if b.status in (BatchStatus.CANCELLED.value, BatchStatus.EXPIRED.value, BatchStatus.FAILED.value):
        v.failed = v.total - v.completed  # the lines that never ran are in the error file
    return v


def _owned_batch(db: Database, key_id: int, batch_id: str) -> Batch:
    with db.session() as s:
        b = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.api_key_id == key_id))
    if b is None:
        raise NoSuchObjectError(f"No batch found with id '{batch_id:.100}'")
    return b


def get_batch(db: Database, settings: Settings, key_id: int, batch_id: str) -> BatchView:
    _owned_batch(db, key_id, batch_id)
    refresh_batch(db, settings, batch_id)
    return _view(db, _owned_batch(db, key_id, batch_id))


def list_batches(
    db: Database, settings: Settings, key_id: int, *, after: str | None, limit: int
) -> tuple[list[BatchView], bool]:
    """A page of the key's batches, newest first, after the batch ``after``; and whether more follow."""
    if not 1 <= limit <= 100:
        raise InvalidRequestError("limit must be between 1 and 100", param="limit")
    q = select(Batch).where(Batch.api_key_id == key_id)
    if after:
        anchor = _owned_batch(db, key_id, after)
        q = q.where(tuple_(Batch.created_at, Batch.id) < tuple_(anchor.created_at, anchor.id))
    with db.session() as s:
        rows = list(s.scalars(q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
    views = [get_batch(db, settings, key_id, b.id) for b in rows[:limit]]
    return views, len(rows) > limit


def cancel_batch(db: Database, settings: Settings, key_id: int, batch_id: str) -> BatchView:
    """in_progress → cancelling: no new chunk starts; the running ones finish and are kept."""
    b = _owned_batch(db, key_id, batch_id)
    if b.status == BatchStatus.IN_PROGRESS.value:
        with db.session() as s:
            s.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status == BatchStatus.IN_PROGRESS.value)
                .values(status=BatchStatus.CANCELLING.value, cancelling_at=utcnow())
            )
        b = _owned_batch(db, key_id, batch_id)
    if b.status != BatchStatus.CANCELLING.value:
        raise BatchStateError(f"Cannot cancel a batch with status '{b.status}'")
    if b.job_id is not None:
        _stop_job(db, b.job_id)
    return get_batch(db, settings, key_id, batch_id)


def refresh_open_batches(db: Database, settings: Settings) -> int:
    """One pass of the server's refresher over every open batch; returns how many it looked at."""
    with db.session() as s:
        ids = list(s.scalars(select(Batch.id).where(Batch.status.in_(BatchStatus.open()))))
    for batch_id in ids:
        refresh_batch(db, settings, batch_id)
    return len(ids)
