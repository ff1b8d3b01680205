"""What a job looks like now: status, counts, rates, ETA; the job list; its rejects.

Reads only: every status change lives in ``jobs/lifecycle.py``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lmjobs.db.models import (
    Chunk,
    Job,
    JobStatus,
    Reject,
    Result,
    ResultStatus,
    utcnow,
)
from lmjobs.db.session import Database
from lmjobs.jobs.errors import UnknownJobError
from lmjobs.jobs.metrics import mean_scores


def get_job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
    if job is None:
        raise UnknownJobError(f"no job {job_id}")
    return job


def result_counts(session: Session, job_id: int) -> tuple[int, int]:
    """(succeeded, failed) result rows of a job."""
    counts = dict(
        session.execute(
            select(Result.status, func.count()).where(Result.job_id == job_id).group_by(Result.status)
        ).all()
    )
    return counts.get(ResultStatus.SUCCEEDED.value, 0), counts.get(ResultStatus.FAILED.value, 0)


@dataclass
class JobStatusReport:
    id: int
    name: str | None
    task: str
    model: str
    status: str
    error: str | None  # why the job as a whole failed (an engine fault), else None
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
                select(Chunk.status, func.count()).where(Chunk.job_id == job_id).group_by(Chunk.status)
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
            rate_tok = int(tokens[1] or 0) / elapsed
            rate_req = (ok + bad) / elapsed
            if rate_req > 0 and pending and not JobStatus(job.status).is_finished:
                eta = pending / rate_req
    return JobStatusReport(
        id=job.id,
        name=job.name,
        task=job.task,
        model=job.model,
        status=job.status,
        error=job.error,
        priority=job.priority,
        requests_total=job.requests_total,
        succeeded=ok,
        failed=bad,
        pending=pending,
        lines_rejected=job.lines_rejected,
        chunks={str(k): int(v) for k, v in chunks.items()},
        input_tokens=int(tokens[0] or 0),
        output_tokens=int(tokens[1] or 0),
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
            s.scalars(select(Reject).where(Reject.job_id == job_id).order_by(Reject.line_number).limit(limit))
        )
