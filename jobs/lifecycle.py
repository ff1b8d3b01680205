"""The lifecycle of jobs and chunks: every status transition, in one module.

Jobs: ``submitting`` → ``scheduled`` | ``queued`` → ``running`` → ``completed`` |
``completed_with_failures`` | ``failed``; ``paused`` at a deadline (``resume``), ``cancelled``
(``cancel``), and back to ``queued`` by ``retry``. Chunks: ``pending`` → ``dispatched`` →
``running`` (a worker holds its lease) → ``done`` | ``cancelled``, and back to ``pending``
when a lease expires, a message is lost, a worker gives the chunk back, or a job pauses.

Every transition is one conditional UPDATE, so two processes racing for the same change
(two workers, two beat hosts, a worker and ``lmjobs cancel``) make it once. The sets of
statuses that queries use (active, open, waiting, finished) are the enums' own
(``db/models.py``).

A chunk's ``requests_succeeded`` / ``requests_failed`` / ``requests_deduplicated`` and
``input_tokens`` / ``output_tokens`` are written by the same UPDATE that closes it (``done``
or ``cancelled``): the requests of that chunk (at most its size) counted by the status of
their sample-0 result (deduplicated: copied from an identical prompt), the prompt tokens of
their sample-0 results (a prompt counts once, however many samples it was asked for, as in
OpenAI's usage) and the output tokens of all their samples; bounded queries through
``ix_requests_chunk`` and the results' unique key. Every UPDATE that reopens a chunk sets
them back to NULL, so ``status``, ``list`` and ``report`` read a job's progress and totals
from its chunks (``jobs/control.py``) and never scan ``results``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from lmjobs.db.models import (
    Chunk,
    ChunkStatus,
    Job,
    JobStatus,
    Reject,
    Request,
    Result,
    ResultStatus,
    utcnow,
)
from lmjobs.db.session import Database, rows_changed
from lmjobs.jobs.control import get_job, job_progress
from lmjobs.jobs.errors import JobStateError

log = logging.getLogger(__name__)


def _results_of_chunk(*columns: Any, sample_0: bool = True) -> Any:
    """Correlated with the chunk being updated: ``columns`` over its requests' results (their
    sample-0 results, unless ``sample_0`` is False), through ``ix_requests_chunk`` and the
    results' unique key."""
    on = [Result.job_id == Request.job_id, Result.request_id == Request.id]
    if sample_0:
        on.append(Result.sample_index == 0)
    return select(*columns).select_from(Request).join(Result, and_(*on)).where(Request.chunk_id == Chunk.id)


def closed_counts() -> dict[str, Any]:
    """The values of an UPDATE that closes chunks: their requests counted by result status,
    the deduplicated ones, and their tokens (prompts once, outputs of every sample)."""

    def count(*where: Any) -> Any:
        return _results_of_chunk(func.count()).where(*where).correlate(Chunk).scalar_subquery()

    def total(column: Any, *, sample_0: bool) -> Any:
        q = _results_of_chunk(func.coalesce(func.sum(column), 0), sample_0=sample_0)
        return q.correlate(Chunk).scalar_subquery()

    return {
        "requests_succeeded": count(Result.status == ResultStatus.SUCCEEDED.value),
        "requests_failed": count(Result.status == ResultStatus.FAILED.value),
        "requests_deduplicated": count(Result.deduplicated.is_(True)),
        "input_tokens": total(Result.input_tokens, sample_0=True),
        "output_tokens": total(Result.output_tokens, sample_0=False),
    }


# The values of an UPDATE that reopens chunks: an open chunk has no counts.
OPEN_COUNTS: dict[str, Any] = dict.fromkeys(
    ("requests_succeeded", "requests_failed", "requests_deduplicated", "input_tokens", "output_tokens")
)


def claim_chunk(
    session: Session, chunk_id: int, *, worker: str, lease_seconds: int, now: datetime | None = None
) -> int | None:
    """Take the chunk's lease with one conditional UPDATE; return the attempt number or None.

    Claimable: pending or dispatched, or running with an expired lease (its worker died),
    and only while its job is active.
    """
    now = now or utcnow()
    active_job = exists().where(
        Job.id == Chunk.job_id,
        Job.status.in_(JobStatus.active()),
    )
    claimable = or_(
        Chunk.status.in_(ChunkStatus.waiting()),
        and_(Chunk.status == ChunkStatus.RUNNING.value, Chunk.lease_expires_at < now),
    )
    res = session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, claimable, active_job)
        .values(
            status=ChunkStatus.RUNNING.value,
            lease_owner=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Chunk.attempts + 1,
            started_at=now,
            **OPEN_COUNTS,
        )
        .execution_options(synchronize_session=False)
    )
    if rows_changed(res) != 1:
        return None
    chunk = session.get(Chunk, chunk_id)
    assert chunk is not None
    session.execute(
        update(Job)
        .where(Job.id == chunk.job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, started_at=now)
    )
    return chunk.attempts


def extend_lease(db: Database, chunk_id: int, *, worker: str, lease_seconds: int) -> bool:
    """Heartbeat: push the lease forward while we still own it. False if it was lost."""
    with db.session() as s:
        res = s.execute(
            update(Chunk)
            .where(
                Chunk.id == chunk_id,
                Chunk.lease_owner == worker,
                Chunk.status == ChunkStatus.RUNNING.value,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        )
        return rows_changed(res) == 1


def release_chunk(db: Database, chunk_id: int, *, worker: str, error: str) -> None:
    """Give the chunk back (graceful shutdown, engine crash): the reconciler redispatches it."""
    with db.session() as s:
        s.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id, Chunk.lease_owner == worker)
            .values(
                status=ChunkStatus.PENDING.value,
                lease_owner=None,
                lease_expires_at=None,
                last_error=error[:2000],
                **OPEN_COUNTS,
            )
        )


def finalize_job_if_done(db: Database, job_id: int) -> str | None:
    """Set the job's final status once no chunk is open. Idempotent; returns the new status.

    Called after the closing transaction has committed, so of two workers closing the
    last two chunks at once, at least the later one sees both closed.
    """
    with db.session() as s:
        progress = job_progress(s, [job_id])[job_id]
        if any(progress.chunks.get(st) for st in ChunkStatus.open()):
            return None
        ok, bad = progress.succeeded, progress.failed
        if bad == 0:
            status = JobStatus.COMPLETED
        elif ok == 0:
            status = JobStatus.FAILED
        else:
            status = JobStatus.COMPLETED_WITH_FAILURES
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(JobStatus.active()))
            .values(status=status.value, finished_at=utcnow())
        )
        finished = rows_changed(res) == 1
    if finished and ok:
        from lmjobs.jobs.metrics import score_job_quietly  # scoring pulls in sacrebleu: only when needed

        score_job_quietly(db, job_id)
    return status.value if finished else None


def start_due_jobs(db: Database, now: datetime) -> list[int]:
    with db.session() as s:
        ids = list(
            s.scalars(select(Job.id).where(Job.status == JobStatus.SCHEDULED.value, Job.start_at <= now))
        )
        if ids:
            s.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.status == JobStatus.SCHEDULED.value)
                .values(status=JobStatus.QUEUED.value)
            )
    return ids


def pause_overdue_jobs(db: Database, now: datetime) -> list[int]:
    """Deadline passed: stop dispatch cleanly; running chunks finish; resumable later."""
    with db.session() as s:
        ids = list(
            s.scalars(
                select(Job.id).where(
                    Job.status.in_(JobStatus.active()),
                    Job.finish_by.is_not(None),
                    Job.finish_by <= now,
                )
            )
        )
        if ids:
            s.execute(update(Job).where(Job.id.in_(ids)).values(status=JobStatus.PAUSED.value))
            s.execute(
                update(Chunk)
                .where(Chunk.job_id.in_(ids), Chunk.status == ChunkStatus.DISPATCHED.value)
                .values(status=ChunkStatus.PENDING.value, dispatched_at=None, **OPEN_COUNTS)
            )
    return ids


def requeue_expired_leases(db: Database, now: datetime) -> int:
    with db.session() as s:
        res = s.execute(
            update(Chunk)
            .where(Chunk.status == ChunkStatus.RUNNING.value, Chunk.lease_expires_at < now)
            .values(
                status=ChunkStatus.PENDING.value,
                lease_owner=None,
                lease_expires_at=None,
                last_error="lease expired: the worker died or lost the database",
                **OPEN_COUNTS,
            )
        )
        return rows_changed(res)


def finish_idle_jobs(db: Database) -> list[int]:
    with db.session() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_(JobStatus.active()))))
    return [j for j in ids if finalize_job_if_done(db, j)]


def cancel_job(db: Database, job_id: int) -> int:
    """Stop dispatch; no new chunk starts. Chunks already running finish and keep their results.

    Returns the number of chunks cancelled.
    """
    job = get_job(db, job_id)
    if JobStatus(job.status).is_finished:
        raise JobStateError(f"job {job_id} is already {job.status}")
    with db.session() as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLED.value, finished_at=utcnow())
        )
        res = s.execute(
            update(Chunk)
            .where(
                Chunk.job_id == job_id,
                Chunk.status.in_(ChunkStatus.waiting()),
            )
            .values(status=ChunkStatus.CANCELLED.value, **closed_counts())
        )
        return rows_changed(res)


def retry_job(db: Database, job_id: int) -> int:
    """Run again only the requests whose result is ``failed``. Returns how many.

    Their failed rows are removed and their chunks reopened in the same transaction, so
    at any moment each request has at most one result row. A cancelled job, or one
    stopped by an engine fault, also gets its never-run chunks back.
    """
    job = get_job(db, job_id)
    if not JobStatus(job.status).is_finished and job.status != JobStatus.PAUSED.value:
        raise JobStateError(f"job {job_id} is {job.status}; retry runs failed requests of a finished job")
    with db.session() as s:
        failed = select(Result.request_id).where(
            Result.job_id == job_id, Result.status == ResultStatus.FAILED.value
        )
        chunk_ids = list(s.scalars(select(Request.chunk_id).where(Request.id.in_(failed)).distinct()))
        n = s.scalar(select(func.count()).select_from(failed.subquery())) or 0
        stopped = job.status == JobStatus.CANCELLED.value or job.error is not None
        if n == 0 and not stopped:
            return 0
        s.execute(update(Request).where(Request.id.in_(failed)).values(isolated_attempts=0))
        s.execute(delete(Result).where(Result.job_id == job_id, Result.status == ResultStatus.FAILED.value))
        s.execute(
            update(Chunk)
            .where(
                Chunk.job_id == job_id,
                (Chunk.id.in_(chunk_ids)) | (Chunk.status == ChunkStatus.CANCELLED.value),
                Chunk.status.in_(ChunkStatus.closed()),
            )
            .values(
                status=ChunkStatus.PENDING.value,
                attempts=0,
                last_error=None,
                finished_at=None,
                **OPEN_COUNTS,
            )
        )
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.QUEUED.value, finished_at=None, error=None)
        )
    return int(n)


def resume_job(db: Database, job_id: int, *, finish_by: datetime | None = None) -> int:
    """Continue a paused (deadline) job: its unfinished requests run; finished ones are kept.

    Returns the number of requests still to run: those of its open chunks, and of closed
    chunks without a result (read from the chunks' counts, not by counting ``results``).
    """
    job = get_job(db, job_id)
    if job.status != JobStatus.PAUSED.value and job.status not in JobStatus.active():
        raise JobStateError(f"job {job_id} is {job.status}; only a paused or active job can be resumed")
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.QUEUED.value if job.started_at is None else JobStatus.RUNNING.value,
                finish_by=finish_by,
            )
        )
    with db.session() as s:
        progress = job_progress(s, [job_id])[job_id]
    return max(0, job.requests_total - progress.succeeded - progress.failed)


def discard_job(db: Database, job_id: int) -> None:
    """Delete a job and everything under it (used for refused and half-made submits)."""
    with db.session() as s:
        for model in (Reject, Request, Chunk):
            s.execute(delete(model).where(model.job_id == job_id))
        s.execute(delete(Job).where(Job.id == job_id))


def close_chunk(session: Session, chunk_id: int, *, worker: str) -> bool:
    """running → done, only while ``worker`` still holds the lease (in the caller's transaction,
    the one that inserts the chunk's results). False: the lease was lost."""
    res = session.execute(
        update(Chunk)
        .where(
            Chunk.id == chunk_id,
            Chunk.lease_owner == worker,
            Chunk.status == ChunkStatus.RUNNING.value,
        )
        .values(
            status=ChunkStatus.DONE.value,
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
            **closed_counts(),
        )
    )
    return rows_changed(res) == 1


def mark_dispatched(db: Database, chunk_id: int, now: datetime) -> bool:
    """pending → dispatched, committed before its message is published; False if someone
    else dispatched it first."""
    with db.session() as s:
        res = s.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id, Chunk.status == ChunkStatus.PENDING.value)
            .values(status=ChunkStatus.DISPATCHED.value, dispatched_at=now)
        )
        return rows_changed(res) == 1


def undispatch(db: Database, chunk_ids: list[int]) -> int:
    """dispatched → pending: the message was not published, or is gone from the broker."""
    if not chunk_ids:
        return 0
    with db.session() as s:
        res = s.execute(
            update(Chunk)
            .where(Chunk.id.in_(chunk_ids), Chunk.status == ChunkStatus.DISPATCHED.value)
            .values(status=ChunkStatus.PENDING.value, dispatched_at=None)
        )
        return rows_changed(res)


def mark_ready(db: Database, job_id: int, *, held: bool, counts: dict[str, object]) -> JobStatus | None:
    """submitting → queued (or scheduled, when ``start_at`` is still to come), with its counts:
    the last step of a submit, so a half-written job never looks complete. None: the job is
    no longer ``submitting`` (deleted meanwhile, as an abandoned submit)."""
    status = JobStatus.SCHEDULED if held else JobStatus.QUEUED
    with db.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.SUBMITTING.value)
            .values(status=status.value, **counts)
        )
        return status if rows_changed(res) == 1 else None


def fail_job(db: Database, job_id: int, error: str) -> bool:
    """An active job → ``failed`` with one error for the job as a whole (an engine fault):
    its waiting chunks are cancelled, its results so far kept. ``retry`` reopens it."""
    now = utcnow()
    with db.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(JobStatus.active()))
            .values(status=JobStatus.FAILED.value, error=error[:2000], finished_at=now)
        )
        if rows_changed(res) != 1:
            return False
        s.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.status.in_(ChunkStatus.waiting()))
            .values(status=ChunkStatus.CANCELLED.value, last_error=error[:2000], **closed_counts())
        )
        return True
