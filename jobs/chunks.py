"""The chunk service: claim a chunk's lease, generate, record results, close the chunk.

The Celery task and ``lmjobs run`` both call :func:`process_chunk`; only the way a
chunk id reaches it differs. Delivery is at least once, results are exactly once
(DESIGN.md item 2):

* the claim is one conditional UPDATE, so a second delivery of a leased, finished or
  cancelled chunk does nothing;
* requests that already have a result are skipped (a chunk that was half done when its
  worker died is not generated again);
* results are inserted with insert-or-ignore on (job, request, sample) in the same
  transaction that closes the chunk;
* a request asked for ``n`` samples is recorded with all ``n`` rows (``sample_index``
  0..n-1) or, when the engine failed or left out any of them, as one failed row (sample 0):
  never as a partial set. Sample 0's row is the request's status, so counts of requests
  are counts of sample-0 rows;
* a heartbeat keeps the lease alive while the engine runs and while the results are
  recorded, so a slow chunk is not taken by a second worker; a dead worker's lease
  expires after ``lease_seconds``;
* when every request fails with the same engine fault (an AttributeError from a library,
  a CUDA error), the chunk is given back and the job stops ``failed`` with that error:
  no row blames the data.

Every status change goes through ``jobs/lifecycle.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from lmjobs.db.models import (
    Chunk,
    Job,
    Request,
    Result,
    ResultStatus,
    utcnow,
)
from lmjobs.db.session import Database
from lmjobs.db.upsert import insert_ignore_many
from lmjobs.jobs.dedup import reuse_finished
from lmjobs.jobs.engine_api import (
    FinishReason,
    GenerateFn,
    Generation,
    GenRequest,
    ModelInfo,
)
from lmjobs.jobs.engine_requests import build_gen_request
from lmjobs.jobs.faults import engine_fault
from lmjobs.jobs.lifecycle import (
    claim_chunk,
    close_chunk,
    extend_lease,
    fail_job,
    finalize_job_if_done,
    release_chunk,
)
from lmjobs.jobs.metrics import score_new_results

log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    chunk_id: int
    claimed: bool
    attempt: int = 0
    generated: int = 0  # requests sent to the engine
    skipped: int = 0  # requests that already had a result
    succeeded: int = 0  # requests, not samples: a request with n samples counts once
    failed: int = 0
    lease_lost: bool = False
    reason: str = ""
    # Recorded one by one, past the attempt cap (counted in succeeded / failed too).
    isolated_succeeded: int = 0
    isolated_failed: int = 0
    # Set when the job was stopped because the engine itself is broken (no rows written).
    engine_fault: str | None = None


# Runs a database step, retrying it while the database is unreachable: (step, what) -> result.
DbRetry = Callable[[Callable[[], Any], str], Any]


@dataclass(frozen=True)
class ChunkContext:
    """Who is running the chunk and with what."""

    worker: str
    model_info: ModelInfo
    lease_seconds: int = 300
    heartbeat_seconds: float = 100.0
    max_attempts: int = 3
    # Workers pass a retry with backoff (worker/tasks.py) so a database outage makes each
    # step wait instead of dropping a generated chunk; None: one try (embedded run).
    db_retry: DbRetry | None = None

    def db(self, fn: Callable[[], Any], what: str) -> Any:
        return self.db_retry(fn, what) if self.db_retry is not None else fn()


class LeaseKeeper:
    """Extends a chunk's lease every ``interval_s`` on a background thread, for as long as
    the worker holds the chunk: while the engine runs *and* while the results are recorded,
    so a commit that stalls longer than the lease cannot let another worker take the chunk.
    ``lost`` turns true when the lease was found taken (the worker was presumed dead)."""

    def __init__(
        self, db: Database, chunk_id: int, *, worker: str, lease_seconds: int, interval_s: float
    ) -> None:
        self._db, self._chunk_id = db, chunk_id
        self._worker, self._lease_seconds, self._interval_s = worker, lease_seconds, interval_s
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name=f"lease-{chunk_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                ok = extend_lease(
                    self._db, self._chunk_id, worker=self._worker, lease_seconds=self._lease_seconds
                )
            except Exception as exc:  # the database blinked: try again next beat
                log.warning("lease heartbeat for chunk %s failed: %s", self._chunk_id, exc)
                continue
            if not ok:
                self.lost = True
                return

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _pending_requests(session: Session, chunk_id: int) -> list[tuple[Request, Job]]:
    has_result = exists().where(Result.request_id == Request.id)
    rows = session.execute(
        select(Request, Job)
        .join(Job, Job.id == Request.job_id)
        .where(Request.chunk_id == chunk_id, ~has_result)
        .order_by(Request.line_number)
    ).all()
    return [(r, j) for r, j in rows]


def _result_row(
    req: Request, job: Job, gen: Generation, gen_req: GenRequest, ctx: ChunkContext, attempt: int
) -> dict[str, Any]:
    ok = gen.ok
    # Stored only when asked for (NULL otherwise), as OpenAI answers them only when asked.
    logprobs = gen.logprobs if ok and gen_req.params.logprobs is not None else None
    return {
        "job_id": req.job_id,
        "request_id": req.id,
        "sample_index": gen.sample_index,
        "status": (ResultStatus.SUCCEEDED if ok else ResultStatus.FAILED).value,
        "output_text": gen.text if ok else None,
        "valid": gen.valid if ok else None,
        "logprobs_json": None if logprobs is None else [t.to_dict() for t in logprobs],
        "error": None if ok else (gen.error or "generation failed"),
        "finish_reason": gen.finish_reason.value,
        "input_tokens": gen.input_tokens,
        "output_tokens": gen.output_tokens,
        "latency_ms": round(gen.latency_ms, 3),
        "model": ctx.model_info.model,
        "model_revision": ctx.model_info.revision,
        "dtype": ctx.model_info.dtype,
        "device": ctx.model_info.device,
        "params_json": gen_req.params.to_dict(),
        "template_version": job.template_version,
        "worker": ctx.worker,
        "attempt": attempt,
        "deduplicated": gen.deduplicated,
        "content_sha256": req.content_sha256,  # what jobs/dedup.py looks up
        "created_at": utcnow(),
    }


def _failed_generation(key: int, error: str) -> Generation:
    return Generation(
        key=key,
        text="",
        finish_reason=FinishReason.ERROR,
        input_tokens=0,
        output_tokens=0,
        latency_ms=0.0,
        error=error,
    )


def _build(pending: list[tuple[Request, Job]]) -> tuple[list[GenRequest], list[Generation]]:
    """Engine requests for the pending rows; rows that cannot be rendered fail right here."""
    gen_reqs: list[GenRequest] = []
    early: list[Generation] = []
    for req, job in pending:
        try:
            gen_reqs.append(build_gen_request(req, job))
        except ValueError as exc:
            early.append(_failed_generation(req.id, f"invalid request: {exc}"))
    return gen_reqs, early


def _request_failed(gen_req: GenRequest, error: str, like: Generation | None = None) -> list[Generation]:
    """A request's answer when it failed: one failed row, sample 0 (no partial sample set)."""
    if like is not None and not like.ok:
        return [dataclasses.replace(like, sample_index=0, valid=None, logprobs=None)]
    gen = _failed_generation(gen_req.key, error)
    if like is not None:
        gen.input_tokens = like.input_tokens
    return [gen]


def _complete(gen_req: GenRequest, gens: Sequence[Generation]) -> list[Generation]:
    """The request's ``n`` samples in order, each as its params asked (log-probabilities when
    asked, a validity verdict for a constrained format); else the request failed, as one row.

    A failed sample fails the request with that sample's error (so an engine fault that
    fails every request still reads as one error); a missing sample fails it with a count.
    """
    n = max(1, gen_req.params.n)
    by_index: dict[int, Generation] = {}
    for g in gens:
        if not 0 <= g.sample_index < n or g.sample_index in by_index:
            log.warning("engine answered request %s with an unexpected sample %s", g.key, g.sample_index)
            continue
        by_index[g.sample_index] = g
    failed = [g for _, g in sorted(by_index.items()) if not g.ok]
    if failed:
        return _request_failed(gen_req, "", failed[0])
    first = by_index.get(0)
    if not by_index:
        return _request_failed(gen_req, "the engine returned no answer for this request")
    if len(by_index) < n:
        missing = [i for i in range(n) if i not in by_index]
        return _request_failed(
            gen_req,
            f"the engine returned {len(by_index)} of {n} samples for this request (missing: "
            f"{', '.join(map(str, missing))})",
            first,
        )
    samples = [by_index[i] for i in range(n)]
    if gen_req.params.logprobs is not None and any(g.logprobs is None for g in samples):
        return _request_failed(
            gen_req, "the engine returned no log-probabilities for this request, which asked for them", first
        )
    if gen_req.params.output_format is not None and any(g.valid is None for g in samples):
        return _request_failed(
            gen_req,
            f"the engine did not check the answer against its {gen_req.params.output_format.kind} format",
            first,
        )
    return samples


def _answers(gen_reqs: Iterable[GenRequest], gens: Iterable[Generation]) -> dict[int, list[Generation]]:
    """Each request's complete answer (see :func:`_complete`), by key."""
    by_key: dict[int, list[Generation]] = {}
    for g in gens:
        by_key.setdefault(g.key, []).append(g)
    return {r.key: _complete(r, by_key.get(r.key, ())) for r in gen_reqs}


def _run_engine(generate: GenerateFn, gen_reqs: Sequence[GenRequest]) -> dict[int, list[Generation]]:
    """Each request's answer by key: all its samples, or one failed row. An engine must answer
    every request and every sample; silence is the request's failure."""
    if not gen_reqs:
        return {}
    return _answers(gen_reqs, generate(gen_reqs))


def _record(
    db: Database, chunk_id: int, rows: list[dict[str, Any]], ctx: ChunkContext, *, close: bool
) -> bool:
    """Insert results (insert-or-ignore) and, if ``close``, close the chunk: one transaction.

    Returns False if the lease had been lost (another worker owns the chunk now); the
    rows are still inserted, harmlessly, since they are ignored on conflict.
    """
    with db.session() as s:
        if rows:
            s.execute(insert_ignore_many(s, Result, ["job_id", "request_id", "sample_index"]), rows)
        return close_chunk(s, chunk_id, worker=ctx.worker) if close else True


def process_chunk(db: Database, chunk_id: int, *, generate: GenerateFn, ctx: ChunkContext) -> ChunkOutcome:
    """Run one chunk end to end. Safe to call any number of times for the same chunk."""

    def claim() -> int | None:
        with db.session() as s:
            return claim_chunk(s, chunk_id, worker=ctx.worker, lease_seconds=ctx.lease_seconds)

    def read() -> tuple[list[tuple[Request, Job]], int]:
        with db.session() as s:
            pending = _pending_requests(s, chunk_id)
            total = s.scalar(select(func.count()).where(Request.chunk_id == chunk_id))
            return pending, total or 0

    attempt = ctx.db(claim, f"claim chunk {chunk_id}")
    if attempt is None:
        return ChunkOutcome(chunk_id, claimed=False, reason="not claimable (done, leased or inactive)")

    outcome = ChunkOutcome(chunk_id, claimed=True, attempt=attempt)
    pending, total = ctx.db(read, f"read chunk {chunk_id}")
    outcome.skipped = total - len(pending)
    job_id = pending[0][1].id if pending else ctx.db(lambda: _job_of(db, chunk_id), "job of chunk")

    # The lease is kept alive from the claim until the chunk is closed: through generation
    # and through recording, so a commit that stalls longer than the lease cannot let a
    # second worker take the chunk and generate it again.
    keeper = LeaseKeeper(
        db, chunk_id, worker=ctx.worker, lease_seconds=ctx.lease_seconds, interval_s=ctx.heartbeat_seconds
    )
    with keeper:
        try:
            rows = _generate_rows(db, chunk_id, pending, generate, ctx, attempt, outcome)
            fault = engine_fault(rows)
        except Exception as exc:
            # The engine itself blew up (not one request): give the chunk back at once so it
            # is retried; past the attempt cap it runs request by request (_run_isolated).
            error = f"{type(exc).__name__}: {exc}"
            ctx.db(
                lambda: release_chunk(db, chunk_id, worker=ctx.worker, error=error),
                f"release chunk {chunk_id}",
            )
            raise
        if fault is not None:
            # Every request failed the same way, and not because of what it asked: the
            # engine or its libraries are broken. No row may blame the data; the job stops.
            ctx.db(lambda: release_chunk(db, chunk_id, worker=ctx.worker, error=fault), "release chunk")
            ctx.db(lambda: fail_job(db, job_id, f"engine fault: {fault}"), f"fail job {job_id}")
            outcome.engine_fault = fault
            return outcome
        closed = ctx.db(lambda: _record(db, chunk_id, rows, ctx, close=True), f"record chunk {chunk_id}")
    outcome.lease_lost = keeper.lost or not closed
    firsts = [r for r in rows if r["sample_index"] == 0]  # one per request: its status
    ok = sum(r["status"] == ResultStatus.SUCCEEDED.value for r in firsts)
    outcome.succeeded = ok + outcome.isolated_succeeded
    outcome.failed = len(firsts) - ok + outcome.isolated_failed
    if closed:
        score_new_results(db, job_id, _scorable(pending, rows))
        ctx.db(lambda: finalize_job_if_done(db, job_id), f"finalize job {job_id}")
    return outcome


def _scorable(
    pending: list[tuple[Request, Job]], rows: list[dict[str, Any]]
) -> list[tuple[int, str, str, str]]:
    """(request id, output, reference, task) of the new successful results that have a
    reference; a request with several samples is scored on its first."""
    refs = {r.id: (r.reference, r.task) for r, _ in pending if r.reference is not None}
    return [
        (row["request_id"], row["output_text"] or "", *refs[row["request_id"]])
        for row in rows
        if row["request_id"] in refs
        and row["sample_index"] == 0
        and row["status"] == ResultStatus.SUCCEEDED.value
    ]


def _generate_rows(
    db: Database,
    chunk_id: int,
    pending: list[tuple[Request, Job]],
    generate: GenerateFn,
    ctx: ChunkContext,
    attempt: int,
    outcome: ChunkOutcome,
) -> list[dict[str, Any]]:
    if attempt > ctx.max_attempts:
        return _run_isolated(db, chunk_id, pending, generate, ctx, attempt, outcome)
    gen_reqs, early = _build(pending)
    req_by_key = {g.key: g for g in gen_reqs}
    job_id = pending[0][1].id if pending else 0
    copies, to_run = reuse_finished(db, job_id, gen_reqs, {r.id: r.content_sha256 for r, _ in pending})
    answers = _run_engine(generate, to_run)
    copied_keys = {g.key for g in copies}
    answers.update(_answers((req_by_key[k] for k in copied_keys), copies))
    answers.update({g.key: [g] for g in early})
    rows: list[dict[str, Any]] = []
    for req, job in pending:  # line order, then sample order
        gen_req = req_by_key.get(req.id) or GenRequest(key=req.id)
        rows.extend(_result_row(req, job, gen, gen_req, ctx, attempt) for gen in answers[req.id])
    outcome.generated = len(to_run)
    return rows


def _run_isolated(
    db: Database,
    chunk_id: int,
    pending: list[tuple[Request, Job]],
    generate: GenerateFn,
    ctx: ChunkContext,
    attempt: int,
    outcome: ChunkOutcome,
) -> list[dict[str, Any]]:
    """The chunk has crashed its workers ``max_attempts`` times: run each request alone.

    Each request's own attempt counter is raised *before* it runs and its result is
    committed right after, so a request that kills the process is found out and, once
    over the cap, recorded as failed without running it again. Its neighbours succeed.
    """

    def count_try(request_id: int) -> int:
        with db.session() as s:
            s.execute(
                update(Request)
                .where(Request.id == request_id)
                .values(isolated_attempts=Request.isolated_attempts + 1)
            )
            return s.scalar(select(Request.isolated_attempts).where(Request.id == request_id)) or 0

    for req, job in pending:
        tries = ctx.db(lambda: count_try(req.id), f"isolated try of request {req.id}")  # noqa: B023
        if tries > ctx.max_attempts:
            gens = [
                _failed_generation(
                    req.id,
                    f"gave up after {tries - 1} isolated attempts: this request crashed the worker each time",
                )
            ]
            gen_req = GenRequest(key=req.id)
        else:
            gen_reqs, early = _build([(req, job)])
            try:
                gens = _run_engine(generate, gen_reqs).get(req.id) or early
            except Exception as exc:  # alone, an exception is this request's own failure
                gens = [_failed_generation(req.id, f"{type(exc).__name__}: {exc}")]
            gen_req = gen_reqs[0] if gen_reqs else GenRequest(key=req.id)
        rows = [_result_row(req, job, gen, gen_req, ctx, attempt) for gen in gens]
        ctx.db(
            lambda: _record(db, chunk_id, rows, ctx, close=False),  # noqa: B023
            "record isolated result",
        )
        outcome.isolated_succeeded += gens[0].ok  # a request, whatever its number of samples
        outcome.isolated_failed += not gens[0].ok
    return []


def _job_of(db: Database, chunk_id: int) -> int:
    with db.session() as s:
        job_id = s.scalar(select(Chunk.job_id).where(Chunk.id == chunk_id))
    assert job_id is not None
    return int(job_id)
