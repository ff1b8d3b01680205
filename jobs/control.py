"""What a job looks like now: status, counts, rates, ETA; the job list; its rejects.

Reads only: every status change lives in ``jobs/lifecycle.py``.

Progress is read from the job's chunks, never by counting ``results``: the UPDATE that
closes a chunk writes how many of its requests succeeded, failed and were deduplicated, and
their tokens (``jobs/lifecycle.py``), so a job's counts and token totals are sums over its
chunks (``ix_chunks_job_id``: one row per 64 requests). A chunk closed by an older version
has no sums; its results are summed instead, bounded by that chunk's requests. Token totals
count closed chunks: a chunk reopened by ``retry`` counts again when it closes.

The reasons of failures are counted over at most ``FAILURE_SAMPLE`` failed results, read
through ``ix_results_job_status``. Mean scores (``tokens=True``, the one-shot ``status``)
are exact while the job has at most ``SCORE_EXACT_LIMIT`` score rows (an aggregate through
``ix_scores_job_id``); above that they are means over the scores of a sample of the job's
closed chunks (:func:`sample_chunks`: up to ``SAMPLE_REQUESTS`` requests in chunks spread
evenly by ``seq``, read through ``ix_requests_chunk`` and ``uq_scores_request_metric``),
and the report says so. ``lmjobs report`` draws its per-row figures from the same sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import Connection, and_, any_, bindparam, case, func, select
from sqlalchemy.types import UserDefinedType

from lmjobs.db.session import Database
from lmjobs.db.tables import (
    ChunkStatus,
    JobStatus,
    ResultStatus,
    chunks,
    jobs,
    rejects,
    requests,
    results,
    scores,
    utcnow,
)
from lmjobs.jobs.errors import UnknownJobError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# A row of ``jobs`` (db/tables.py), read with Core: its columns by name (``job.status``,
# ``job.requests_total``, ...). Read-only: changes go through ``jobs/lifecycle.py``.
JobRow: TypeAlias = Any


def core(conn: Connection | Session) -> Connection:
    """The Core connection of a Session (callers that also write hold one), or ``conn``.
    Every function here reads with Core statements, through either."""
    return conn if isinstance(conn, Connection) else conn.connection()


def job_row(conn: Connection | Session, job_id: int) -> JobRow | None:
    """The job's row, or None."""
    return conn.execute(select(jobs).where(jobs.c.id == job_id)).one_or_none()


def get_job(db: Database, job_id: int) -> JobRow:
    with db.connection() as conn:
        job = job_row(conn, job_id)
    if job is None:
        raise UnknownJobError(f"no job {job_id}")
    return job


FAILURE_SAMPLE = 10_000  # failed results whose reasons ``status`` counts, at most
TOP_REASONS = 10


@dataclass
class Progress:
    """A job's requests by outcome and its token totals, from its (closed) chunks."""

    succeeded: int = 0
    failed: int = 0
    chunks: dict[str, int] = field(default_factory=dict)  # chunk status -> chunks
    input_tokens: int = 0  # prompts of the requests, each once (sample 0)
    output_tokens: int = 0  # every sample
    deduplicated: int = 0  # requests copied from an identical prompt
    # Of its closed chunks that have a ``finished_at``: the first start and the last finish
    # (the span of a big job's throughput in ``report``), read in the same pass.
    first_started: datetime | None = None
    last_finished: datetime | None = None


_SUMS = ("requests_succeeded", "requests_failed", "requests_deduplicated", "input_tokens", "output_tokens")


def _summed() -> Any:
    """A closed chunk whose sums were written when it closed (every one of them)."""
    return and_(chunks.c.status.in_(ChunkStatus.closed()), *(chunks.c[c].is_not(None) for c in _SUMS))


def job_progress(session: Connection | Session, job_ids: Sequence[int]) -> dict[int, Progress]:
    """Progress and token totals of each job, summed over its chunks: one grouped query over
    ``chunks`` (which also reads the span of the closed chunks, ``first_started`` and
    ``last_finished``), and for closed chunks without sums (closed by an older version) a sum
    over their requests' results, bounded by those chunks."""
    out = {j: Progress() for j in job_ids}
    if not job_ids:
        return out
    summed = _summed()
    unsummed = and_(chunks.c.status.in_(ChunkStatus.closed()), ~summed)
    rows = session.execute(
        select(
            chunks.c.job_id,
            chunks.c.status,
            func.count(),
            *(func.coalesce(func.sum(chunks.c[c]), 0) for c in _SUMS),
            func.count().filter(unsummed),
            func.min(chunks.c.started_at).filter(chunks.c.finished_at.is_not(None)),
            func.max(chunks.c.finished_at),
        )
        .where(chunks.c.job_id.in_(job_ids))
        .group_by(chunks.c.job_id, chunks.c.status)
    ).all()
    legacy: set[int] = set()
    for job_id, status, n, ok, bad, dedup, tin, tout, n_unsummed, first, last in rows:
        p = out[int(job_id)]
        p.chunks[str(status)] = int(n)
        if status in ChunkStatus.closed():  # (an open chunk's are NULL)
            _add(p, ok, bad, dedup, tin, tout)
            if last is not None:
                p.last_finished = last if p.last_finished is None else max(p.last_finished, last)
            if first is not None:
                p.first_started = first if p.first_started is None else min(p.first_started, first)
        if n_unsummed:
            legacy.add(int(job_id))
    if legacy:
        # Closed chunks without (all of) their sums: take back what they hold, count their results.
        for job_id, *held in session.execute(
            select(chunks.c.job_id, *(func.coalesce(func.sum(chunks.c[c]), 0) for c in _SUMS))
            .where(chunks.c.job_id.in_(sorted(legacy)), unsummed)
            .group_by(chunks.c.job_id)
        ).all():
            _add(out[int(job_id)], *(-int(v or 0) for v in held))
        first = results.c.sample_index == 0
        for job_id, ok, bad, dedup, tin, tout in session.execute(
            select(
                chunks.c.job_id,
                func.count().filter(first, results.c.status == ResultStatus.SUCCEEDED.value),
                func.count().filter(first, results.c.status == ResultStatus.FAILED.value),
                func.count().filter(first, results.c.deduplicated.is_(True)),
                func.coalesce(func.sum(case((first, results.c.input_tokens), else_=0)), 0),
                func.coalesce(func.sum(results.c.output_tokens), 0),
            )
            .select_from(chunks)
            .join(requests, requests.c.chunk_id == chunks.c.id)
            .join(results, and_(results.c.job_id == requests.c.job_id, results.c.request_id == requests.c.id))
            .where(chunks.c.job_id.in_(sorted(legacy)), unsummed)
            .group_by(chunks.c.job_id)
        ).all():
            _add(out[int(job_id)], ok, bad, dedup, tin, tout)
    return out


def _add(p: Progress, ok: Any, bad: Any, dedup: Any, tin: Any, tout: Any) -> None:
    p.succeeded += int(ok or 0)
    p.failed += int(bad or 0)
    p.deduplicated += int(dedup or 0)
    p.input_tokens += int(tin or 0)
    p.output_tokens += int(tout or 0)


# -- a bounded sample of a job's requests, for the figures that need rows ------------------

SAMPLE_REQUESTS = 12_800  # requests a sample holds, about (200 chunks of 64)
SAMPLE_CHUNKS = 200  # chunks a sample is drawn from, at most
SCORE_EXACT_LIMIT = 20_000  # score rows a job may have for exact means in ``status``


# Keys one statement of :func:`keyed_rows` looks up, at most. Few enough that PostgreSQL's
# planner keeps to the index for them (a lookup per key) unless the table is hardly bigger
# than a batch, when a scan of it is cheap anyway; 12.8k keys at once, 2% of a 1M-request
# job's results, planned a parallel scan of all of them.
KEYS_PER_STATEMENT = 1000


class _BigIntArrayText(UserDefinedType[str]):
    """A ``BIGINT[]`` parameter bound as the array's text, ``{1,2,3}``, which the statement's
    ``::BIGINT[]`` casts: the same statement, and psycopg need not format a list of 1,000 keys
    element by element in Python (about three times the time, a few ms a statement)."""

    cache_ok = True
    render_bind_cast = True

    def get_col_spec(self, **kw: Any) -> str:
        return "BIGINT[]"


def keyed_rows(session: Connection | Session, stmt: Any, column: Any, keys: Sequence[int]) -> list[Any]:
    """The rows of ``stmt`` whose integer ``column`` is one of ``keys``: lookups of an indexed
    key (a sample's 200 chunks, its ~12.8k requests' results or scores), ``KEYS_PER_STATEMENT``
    keys a statement, never a join the planner could turn into a scan. The one difference
    between the databases is how the keys are bound: PostgreSQL gets one array parameter
    (``= ANY(:keys)``, bound as the array's text; a long ``IN`` list costs it more to parse and
    plan than the lookups), SQLite (no arrays, at most 999 bound variables before 3.32) the
    integers written into ``IN (...)``. Core rows: no ORM step per row."""
    conn = core(session)
    pg = conn.dialect.name == "postgresql"
    out: list[Any] = []
    for i in range(0, len(keys), KEYS_PER_STATEMENT):
        batch = [int(k) for k in keys[i : i + KEYS_PER_STATEMENT]]
        if pg:
            text = "{" + ",".join(map(str, batch)) + "}"
            cond = column == any_(bindparam("keys", text, type_=_BigIntArrayText()))
        else:
            cond = column.in_(bindparam("keys", batch, expanding=True, literal_execute=True))
        out += conn.execute(stmt.where(cond)).all()
    return out


@dataclass
class Sample:
    """Closed chunks of a job spread evenly by ``seq``: ``chunk_ids``, of ``chunks_closed``."""

    chunk_ids: list[int]
    chunks_closed: int
    _chunk_of: dict[int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def chunks(self) -> int:
        return len(self.chunk_ids)

    def _chunk_index(self, session: Connection | Session) -> dict[int, int]:
        """Each sampled request id -> its chunk's place in the sample: one statement that
        ``ix_requests_chunk`` answers alone (chunk id and id), read once per sample. (A
        request's ids need not be contiguous within its chunk, so there is no id range to
        read instead.)"""
        if self._chunk_of is None:
            at = {c: i for i, c in enumerate(self.chunk_ids)}
            rows = keyed_rows(
                session, select(requests.c.id, requests.c.chunk_id), requests.c.chunk_id, self.chunk_ids
            )
            self._chunk_of = {rid: at[c] for rid, c in rows}
        return self._chunk_of

    def request_ids(self, session: Connection | Session) -> list[int]:
        """The sampled chunks' request ids, in no particular order."""
        return list(self._chunk_index(session))

    def in_order(self, session: Connection | Session, rows: list[Any]) -> list[Any]:
        """``rows`` whose first item is a request id, sorted by the sample's order: its chunks
        by ``seq``, then the request ids, then the rest of each row. (Sums of floats over a
        sample, such as a mean score, come out the same whatever order the rows were read in.)"""
        chunk_of = self._chunk_index(session)
        return sorted(rows, key=lambda r: (chunk_of[r[0]], *r))


def sample_chunks(
    session: Connection | Session, job_id: int, chunks_closed: int, requests_per_chunk: float
) -> Sample:
    """Up to ``SAMPLE_CHUNKS`` of the job's closed chunks, about ``SAMPLE_REQUESTS`` requests,
    every ``step``-th by ``seq`` (one pass over the job's chunk rows through its index on
    ``job_id``). Deterministic: the same job gives the same sample."""
    want = max(1, min(SAMPLE_CHUNKS, round(SAMPLE_REQUESTS / max(1.0, requests_per_chunk))))
    step = max(1, -(-chunks_closed // want))  # ceil: at most ``want`` multiples of it
    ids = list(
        session.scalars(
            select(chunks.c.id)
            .where(
                chunks.c.job_id == job_id,
                chunks.c.status.in_(ChunkStatus.closed()),
                (chunks.c.seq % step) == 0,
            )
            .order_by(chunks.c.seq)
            .limit(2 * want)
        )
    )
    if len(ids) > want:  # closed chunks bunched on the multiples of step: thin them evenly
        ids = [ids[i * len(ids) // want] for i in range(want)]
    return Sample(chunk_ids=[int(c) for c in ids], chunks_closed=chunks_closed)


def sampled_scores(session: Connection | Session, sample: Sample) -> list[tuple[int, str, float]]:
    """(request id, metric, value) of the sampled chunks' requests, in the sample's order
    (:meth:`Sample.in_order`): their keys looked up in ``uq_scores_request_metric``."""
    stmt = select(scores.c.request_id, scores.c.metric, scores.c.value)
    ids = sample.request_ids(session)
    return sample.in_order(session, keyed_rows(session, stmt, scores.c.request_id, ids))


@dataclass
class ScoreMeans:
    means: dict[str, float]
    sampled: bool = False  # means over the scores of a sample of the job's requests
    requests: int = 0  # scored requests the sampled means are over
    scores: list[tuple[int, str, float]] = field(default_factory=list)  # the sampled ones


def bounded_mean_scores(
    session: Connection | Session,
    job_id: int,
    progress: Progress,
    requests_total: int,
    sample: Sample | None = None,
) -> ScoreMeans:
    """Exact means while the job has at most ``SCORE_EXACT_LIMIT`` score rows (a LIMITed count
    through ``ix_scores_job_id``), else means over a sample of closed chunks (``sample``, or
    :func:`sample_of` the job)."""
    counted = session.scalar(
        select(func.count()).select_from(
            select(scores.c.id).where(scores.c.job_id == job_id).limit(SCORE_EXACT_LIMIT + 1).subquery()
        )
    )
    if not counted:
        return ScoreMeans({})
    if int(counted) <= SCORE_EXACT_LIMIT:
        rows = session.execute(
            select(scores.c.metric, func.avg(scores.c.value))
            .where(scores.c.job_id == job_id)
            .group_by(scores.c.metric)
            .order_by(scores.c.metric)
        ).all()
        return ScoreMeans({str(m): float(v) for m, v in rows if v is not None})
    if sample is None:
        sample = sample_of(session, job_id, progress, requests_total)
    found = sampled_scores(session, sample)
    sums: dict[str, list[float]] = {}
    for _, metric, value in found:
        acc = sums.setdefault(metric, [0.0, 0.0])
        acc[0] += value
        acc[1] += 1
    means = {m: total / n for m, (total, n) in sorted(sums.items())}
    return ScoreMeans(means, sampled=True, requests=len({rid for rid, _, _ in found}), scores=found)


def sample_of(session: Connection | Session, job_id: int, progress: Progress, requests_total: int) -> Sample:
    """:func:`sample_chunks` of the job, sized from its chunk counts."""
    chunks_total = sum(progress.chunks.values())
    closed = sum(progress.chunks.get(st, 0) for st in ChunkStatus.closed())
    return sample_chunks(session, job_id, closed, requests_total / max(1, chunks_total))


def result_counts(session: Connection | Session, job_id: int) -> tuple[int, int]:
    """(succeeded, failed) requests of a job's closed chunks (see :func:`job_progress`)."""
    p = job_progress(session, [job_id])[job_id]
    return p.succeeded, p.failed


def failure_reasons(
    session: Connection | Session, job_id: int, *, top: int = TOP_REASONS
) -> tuple[dict[str, int], int]:
    """The most common errors among at most ``FAILURE_SAMPLE`` failed requests of the job
    (their sample-0 results, through ``ix_results_job_status``), most common first; and how
    many failed requests they were counted over (all of them when there are no more)."""
    sample = (
        select(results.c.error)
        .where(
            results.c.job_id == job_id,
            results.c.status == ResultStatus.FAILED.value,
            results.c.sample_index == 0,
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
    input_tokens: int  # prompts, each once (sample 0), of closed chunks
    output_tokens: int  # every sample, of closed chunks
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
    deduplicated: int = 0  # requests copied from an identical prompt
    scores: dict[str, float] = field(default_factory=dict)  # mean per metric (jobs/metrics.py)
    # Failed requests that ``failures_by_reason`` was counted over (< failed: a sample).
    failures_counted: int = 0
    # True: ``scores`` are means over the scores of ``scores_sample_requests`` requests of a
    # sample of the job's chunks (see the module's docstring), not over all of them.
    scores_sampled: bool = False
    scores_sample_requests: int = 0

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
    """Where the job stands: counts and token totals from its chunks (bounded; see the
    module's docstring).

    ``tokens``: also the mean scores (the one-shot ``status``; exact for a small job, else
    over a sample); without them (a ``--watch`` refresh) the report costs a few indexed
    queries."""
    with db.connection() as conn:
        job = job_row(conn, job_id)
        if job is None:
            raise UnknownJobError(f"no job {job_id}")
        progress = job_progress(conn, [job_id])[job_id]
        reasons = failure_reasons(conn, job_id) if progress.failed else ({}, 0)
        means = bounded_mean_scores(conn, job_id, progress, job.requests_total) if tokens else ScoreMeans({})
    return _report(job, progress, reasons, means, now=now or utcnow())


def _report(
    job: JobRow,
    progress: Progress,
    reasons: tuple[dict[str, int], int],
    scores: ScoreMeans,
    *,
    now: datetime,
) -> JobStatusReport:
    ok, bad = progress.succeeded, progress.failed
    tin, tout = progress.input_tokens, progress.output_tokens
    pending = max(0, job.requests_total - ok - bad)
    elapsed = rate_tok = rate_req = eta = None
    if job.started_at is not None:
        end = job.finished_at or now
        elapsed = max(0.0, (end - job.started_at).total_seconds())
        if elapsed > 0:
            rate_tok = tout / elapsed
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
        deduplicated=progress.deduplicated,
        scores=scores.means,
        failures_counted=reasons[1],
        scores_sampled=scores.sampled,
        scores_sample_requests=scores.requests,
    )


def list_jobs(
    db: Database, *, limit: int = 50, status: str | None = None, tokens: bool = False
) -> list[JobStatusReport]:
    """The latest jobs, newest first; the progress and token totals of the whole page in one
    query over its chunks (``tokens``: also mean scores, as in :func:`job_status`)."""
    now = utcnow()
    with db.connection() as conn:
        q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if status:
            q = q.where(jobs.c.status == status)
        page = list(conn.execute(q))
        progress = job_progress(conn, [j.id for j in page])
        reasons = {j.id: failure_reasons(conn, j.id) if progress[j.id].failed else ({}, 0) for j in page}
        means = {
            j.id: bounded_mean_scores(conn, j.id, progress[j.id], j.requests_total)
            if tokens
            else ScoreMeans({})
            for j in page
        }
    return [_report(j, progress[j.id], reasons[j.id], means[j.id], now=now) for j in page]


def job_rejects(db: Database, job_id: int, *, limit: int = 1000) -> list[Any]:
    """The job's rejected lines (rows of ``rejects``), by line number."""
    with db.connection() as conn:
        return list(
            conn.execute(
                select(rejects).where(rejects.c.job_id == job_id).order_by(rejects.c.line_number).limit(limit)
            )
        )
