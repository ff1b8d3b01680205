"""Job lifecycle after submit: status, list, cancel, retry, resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

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
from lmjobs.db.session import Database
from lmjobs.jobs.chunks import result_counts
from lmjobs.jobs.errors import JobStateError, UnknownJobError
from lmjobs.jobs.metrics import mean_scores


@dataclass
class JobStatusReport:
    id: int
    name: str | None
    task: str
    model: str
    status: str
    priority: int
    requests_total: int
    succeeded: int
    failed: int
    pending: int
    lines_rejected: int
    chunks: dict[str, int]
    input_tokens: int
    output_tokens: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    start_at: datetime | None
    finish_by: datetime | None
    elapsed_s: float | None
    output_tokens_per_s: float | None
    requests_per_s: float | None
    eta_s: float | None
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    deduplicated: int = 0  # results copied from an identical prompt instead of generated
    scores: dict[str, float] = field(default_factory=dict)  # mean per metric (jobs/metrics.py)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, datetime):
                d[k] = v.isoformat()
        return d


def get_job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
    if job is None:
        raise UnknownJobError(f"no job {job_id}")
    return job


def job_status(db: Database, job_id: int, *, now: datetime | None = None) -> JobStatusReport:
    """Counts come from the results table itself, so status never disagrees with the data."""
    job = get_job(db, job_id)
    now = now or utcnow()
    with db.session() as s:
        ok, bad = result_counts(s, job_id)
        tokens = s.execute(
            select(
                func.coalesce(func.sum(Result.input_tokens), 0),
                func.coalesce(func.sum(Result.output_tokens), 0),
                func.count().filter(Result.deduplicated.is_(True)),
            ).where(Result.job_id == job_id)
        ).one()
        chunks = dict(
            s.execute(
                select(Chunk.status, func.count())
                .where(Chunk.job_id == job_id)
                .group_by(Chunk.status)
            ).all()
        )
        reasons = dict(
            s.execute(
                select(Result.error, func.count())
                .where(Result.job_id == job_id, Result.status == ResultStatus.FAILED.value)
                .group_by(Result.error)
                .order_by(func.count().desc())
                .limit(10)
            ).all()
        )
    pending = max(0, job.requests_total - ok - bad)
    elapsed = rate_tok = rate_req = eta = None
    if job.started_at is not None:
        end = job.finished_at or now
        elapsed = max(0.0, (end - job.started_at).total_seconds())
        if elapsed > 0:
            rate_tok = tokens[1] / elapsed
            rate_req = (ok + bad) / elapsed
            if rate_req > 0 and pending and not JobStatus(job.status).is_finished:
                eta = pending / rate_req
    return JobStatusReport(
        id=job.id,
        name=job.name,
        task=job.task,
        model=job.model,
        status=job.status,
        priority=job.priority,
        requests_total=job.requests_total,
        succeeded=ok,
        failed=bad,
        pending=pending,
        lines_rejected=job.lines_rejected,
        chunks={str(k): int(v) for k, v in chunks.items()},
        input_tokens=int(tokens[0]),
        output_tokens=int(tokens[1]),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        start_at=job.start_at,
        finish_by=job.finish_by,
        elapsed_s=elapsed,
        output_tokens_per_s=rate_tok,
        requests_per_s=rate_req,
        eta_s=eta,
        failures_by_reason={str(k)[:200]: int(v) for k, v in reasons.items()},
        deduplicated=int(tokens[2]),
        scores=mean_scores(db, job_id),
    )


def list_jobs(db: Database, *, limit: int = 50, status: str | None = None) -> list[JobStatusReport]:
    with db.session() as s:
        q = select(Job.id).order_by(Job.id.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        ids = list(s.scalars(q))
    return [job_status(db, j) for j in ids]


def job_rejects(db: Database, job_id: int, *, limit: int = 1000) -> list[Reject]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Reject)
                .where(Reject.job_id == job_id)
                .order_by(Reject.line_number)
                .limit(limit)
            )
        )


def cancel_job(db: Database, job_id: int) -> int:
    """Stop dispatch; no new chunk starts. Chunks already running finish and keep their results.

    Returns the number of chunks cancelled.
    """
    job = get_job(db, job_id)
    if JobStatus(job.status).is_finished:
        raise JobStateError(f"job {job_id} is already {job.status}")
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.CANCELLED.value, finished_at=utcnow())
        )
        res = s.execute(
            update(Chunk)
            .where(
                Chunk.job_id == job_id,
                Chunk.status.in_([ChunkStatus.PENDING.value, ChunkStatus.DISPATCHED.value]),
            )
            .values(status=ChunkStatus.CANCELLED.value)
        )
        return int(res.rowcount or 0)


def retry_job(db: Database, job_id: int) -> int:
    """Run again only the requests whose result is ``failed``. Returns how many.

    Their failed rows are removed and their chunks reopened in the same transaction, so
    at any moment each request has at most one result row.
    """
    job = get_job(db, job_id)
    if not JobStatus(job.status).is_finished and job.status != JobStatus.PAUSED.value:
        raise JobStateError(
            f"job {job_id} is {job.status}; retry runs failed requests of a finished job"
        )
    with db.session() as s:
        failed = select(Result.request_id).where(
            Result.job_id == job_id, Result.status == ResultStatus.FAILED.value
        )
        chunk_ids = list(
            s.scalars(select(Request.chunk_id).where(Request.id.in_(failed)).distinct())
        )
        n = s.scalar(select(func.count()).select_from(failed.subquery())) or 0
        if n == 0 and job.status != JobStatus.CANCELLED.value:
            return 0
        s.execute(update(Request).where(Request.id.in_(failed)).values(isolated_attempts=0))
        s.execute(
            delete(Result).where(
                Result.job_id == job_id, Result.status == ResultStatus.FAILED.value
            )
        )
        reopen = [ChunkStatus.DONE.value, ChunkStatus.CANCELLED.value]
        s.execute(
            update(Chunk)
            .where(
                Chunk.job_id == job_id,
                (Chunk.id.in_(chunk_ids)) | (Chunk.status == ChunkStatus.CANCELLED.value),
                Chunk.status.in_(reopen),
            )
            .values(status=ChunkStatus.PENDING.value, attempts=0, last_error=None, finished_at=None)
        )
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.QUEUED.value, finished_at=None)
        )
    return int(n)


def resume_job(db: Database, job_id: int, *, finish_by: datetime | None = None) -> int:
    """Continue a paused (deadline) job: its unfinished requests run; finished ones are kept.

    Returns the number of requests still to run.
    """
    job = get_job(db, job_id)
    if job.status not in (JobStatus.PAUSED.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value):
        raise JobStateError(
            f"job {job_id} is {job.status}; only a paused or active job can be resumed"
        )
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.QUEUED.value
                if job.started_at is None
                else JobStatus.RUNNING.value,
                finish_by=finish_by,
            )
        )
    st = job_status(db, job_id)
    return st.pending
