"""What a job looks like now: status, counts, rates, ETA; the job list; its rejects.

Reads only: every status change lives in ``jobs/lifecycle.py``.

Progress is read from the job's chunks, never by counting ``results``: the UPDATE that
closes a chunk writes how many of its requests succeeded and failed (``jobs/lifecycle.py``),
so a job's counts are sums over its chunks (``ix_chunks_job_id``: one row per 64 requests).
A chunk closed by an older version has no counts; its results are counted instead, bounded
by that chunk's requests. The reasons of failures are counted over at most
``FAILURE_SAMPLE`` failed results, read through ``ix_results_job_status``.
Token totals, deduplicated results and mean scores are sums over the job's rows
(``tokens=True``, the one-shot ``status``); ``list`` and each ``status --watch`` refresh
leave them out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
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
from lmjobs.db.session import Database
from lmjobs.jobs.errors import UnknownJobError
from lmjobs.jobs.metrics import mean_scores


def get_job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
    if job is None:
        raise UnknownJobError(f"no job {job_id}")
    return job


FAILURE_SAMPLE = 10_000  # failed results whose reasons ``status`` counts, at most
TOP_REASONS = 10


@dataclass
class Progress:
    """A job's requests by outcome, from its chunks."""

    succeeded: int = 0
    failed: int = 0
    chunks: dict[str, int] = field(default_factory=dict)  # chunk status -> chunks


def job_progress(session: Session, job_ids: Sequence[int]) -> dict[int, Progress]:
    """Progress of each job, summed over its chunks: one grouped query over ``chunks``, and
    for closed chunks without counts (closed before counts were kept) a count of their
    requests' sample-0 results, bounded by those chunks."""
    out = {j: Progress() for j in job_ids}
    if not job_ids:
        return out
    closed = Chunk.status.in_(ChunkStatus.closed())
    uncounted = and_(closed, Chunk.requests_succeeded.is_(None))
    rows = session.execute(
        select(
            Chunk.job_id,
            Chunk.status,
            func.count(),
            func.coalesce(func.sum(Chunk.requests_succeeded), 0),
            func.coalesce(func.sum(Chunk.requests_failed), 0),
            func.count().filter(uncounted),
        )
        .where(Chunk.job_id.in_(job_ids))
        .group_by(Chunk.job_id, Chunk.status)
    ).all()
    legacy: set[int] = set()
    for job_id, status, n, ok, bad, n_uncounted in rows:
        p = out[int(job_id)]
        p.chunks[str(status)] = int(n)
        if status in ChunkStatus.closed():
            p.succeeded += int(ok or 0)
            p.failed += int(bad or 0)
        if n_uncounted:
            legacy.add(int(job_id))
    if legacy:
        for job_id, status, n in session.execute(
            select(Chunk.job_id, Result.status, func.count())
            .select_from(Chunk)
            .join(Request, Request.chunk_id == Chunk.id)
            .join(
                Result,
                and_(
                    Result.job_id == Request.job_id,
                    Result.request_id == Request.id,
                    Result.sample_index == 0,
                ),
            )
            .where(Chunk.job_id.in_(sorted(legacy)), uncounted)
            .group_by(Chunk.job_id, Result.status)
        ).all():
            p = out[int(job_id)]
            if status == ResultStatus.SUCCEEDED.value:
                p.succeeded += int(n)
            elif status == ResultStatus.FAILED.value:
                p.failed += int(n)
    return out


def result_counts(session: Session, job_id: int) -> tuple[int, int]:
    """(succeeded, failed) requests of a job's closed chunks (see :func:`job_progress`)."""
    p = job_progress(session, [job_id])[job_id]
    return p.succeeded, p.failed


def failure_reasons(session: Session, job_id: int, *, top: int = TOP_REASONS) -> tuple[dict[str, int], int]:
    """The most common errors among at most ``FAILURE_SAMPLE`` failed requests of the job
    (their sample-0 results, through ``ix_results_job_status``), most common first; and how
    many failed requests they were counted over (all of them when there are no more)."""
    sample = (
        select(Result.error)
        .where(
            Result.job_id == job_id,
            Result.status == ResultStatus.FAILED.value,
            Result.sample_index == 0,
        )
        .limit(FAILURE_SAMPLE)
        .subquery()
    )
    counted = int(session.scalar(select(func.count()).select_from(sample)) or 0)
    if not counted:
        return {}, 0
    rows = session.execute(
        select(sample.c.error, func.count())
        .group_by(sample.c.error)
        .order_by(func.count().desc(), sample.c.error)
        .limit(top)
    ).all()
    return {str(e or "(no message)")[:300]: int(n) for e, n in rows}, counted


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
    input_tokens: int | None  # None: not summed (``tokens=False``)
    output_tokens: int | None
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
    deduplicated: int | None = 0  # results copied from an identical prompt; None: not counted
    scores: dict[str, float] = field(default_factory=dict)  # mean per metric (jobs/metrics.py)
    # Failed requests that ``failures_by_reason`` was counted over (< failed: a sample).
    failures_counted: int = 0

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, datetime):
                d[k] = v.isoformat()
        return d


def job_status(
    db: Database, job_id: int, *, now: datetime | None = None, tokens: bool = True
) -> JobStatusReport:
    """Where the job stands: counts from its chunks (bounded; see the module's docstring).

    ``tokens``: also sum the tokens, deduplicated results and mean scores of its rows,
    work that grows with the job; without them the report costs a few indexed queries."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UnknownJobError(f"no job {job_id}")
        progress = job_progress(s, [job_id])[job_id]
        reasons = failure_reasons(s, job_id) if progress.failed else ({}, 0)
    return _report(db, job, progress, reasons, now=now or utcnow(), tokens=tokens)


def _token_sums(db: Database, job_id: int) -> tuple[int, int, int]:
    with db.session() as s:
        tin, tout, dedup = s.execute(
            select(
                func.coalesce(func.sum(Result.input_tokens), 0),
                func.coalesce(func.sum(Result.output_tokens), 0),
                func.count().filter(Result.deduplicated.is_(True)),
            ).where(Result.job_id == job_id)
        ).one()
    return int(tin or 0), int(tout or 0), int(dedup or 0)


def _report(
    db: Database,
    job: Job,
    progress: Progress,
    reasons: tuple[dict[str, int], int],
    *,
    now: datetime,
    tokens: bool,
) -> JobStatusReport:
    ok, bad = progress.succeeded, progress.failed
    tin = tout = dedup = None
    if tokens:
        tin, tout, dedup = _token_sums(db, job.id)
    pending = max(0, job.requests_total - ok - bad)
    elapsed = rate_tok = rate_req = eta = None
    if job.started_at is not None:
        end = job.finished_at or now
        elapsed = max(0.0, (end - job.started_at).total_seconds())
        if elapsed > 0:
            rate_tok = tout / elapsed if tout is not None else None
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
        chunks=dict(progress.chunks),
        input_tokens=tin,
        output_tokens=tout,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        start_at=job.start_at,
        finish_by=job.finish_by,
        elapsed_s=elapsed,
        output_tokens_per_s=rate_tok,
        requests_per_s=rate_req,
        eta_s=eta,
        failures_by_reason={k[:200]: v for k, v in reasons[0].items()},
        deduplicated=dedup,
        scores=mean_scores(db, job.id) if tokens else {},
        failures_counted=reasons[1],
    )


def list_jobs(
    db: Database, *, limit: int = 50, status: str | None = None, tokens: bool = False
) -> list[JobStatusReport]:
    """The latest jobs, newest first; the progress of the whole page in one query over its
    chunks (``tokens`` as in :func:`job_status`)."""
    now = utcnow()
    with db.session() as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        jobs = list(s.scalars(q))
        progress = job_progress(s, [j.id for j in jobs])
        reasons = {j.id: failure_reasons(s, j.id) if progress[j.id].failed else ({}, 0) for j in jobs}
    return [_report(db, j, progress[j.id], reasons[j.id], now=now, tokens=tokens) for j in jobs]


def job_rejects(db: Database, job_id: int, *, limit: int = 1000) -> list[Reject]:
    with db.session() as s:
        return list(
            s.scalars(select(Reject).where(Reject.job_id == job_id).order_by(Reject.line_number).limit(limit))
        )
