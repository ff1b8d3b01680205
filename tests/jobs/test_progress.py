"""A job's progress is read from its chunks (issue 13, item 4): the counts a closing UPDATE
writes stay right through close, reopen, give-up, isolation and cancel; ``status``, ``list``
and ``report`` never count ``results``; ``status --watch`` refreshes with a few fixed
statements. SQLite and PostgreSQL; the EXPLAIN test is PostgreSQL's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from analytics_data import FAKE_CTX, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from services import cli_env, run_cli
from sqlalchemy import case, event, func, select, update

from lmjobs.bench.follow import build_job
from lmjobs.db.models import Chunk, ChunkStatus, Request, Result, Score, utcnow
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.control import FAILURE_SAMPLE, job_progress, job_status, list_jobs
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.lifecycle import (
    cancel_job,
    claim_chunk,
    close_chunk,
    finalize_job_if_done,
    requeue_expired_leases,
    retry_job,
    start_due_jobs,
)
from lmjobs.jobs.metrics import mean_scores
from lmjobs.jobs.report import _failures, build_report
from lmjobs.jobs.submit import SubmitOptions


def _fail_every_third(requests: Sequence[GenRequest]) -> list[Generation]:
    """The fake engine's answers, except that every request whose key is divisible by 3 fails."""
    ok = {g.key: g for g in FakeEngine()(requests)}
    return [
        Generation(r.key, "", FinishReason.ERROR, 3, 0, 1.0, error=f"ValueError: bad {r.key % 2}")
        if r.key % 3 == 0
        else ok[r.key]
        for r in requests
    ]


def _slow_counts(db: Database, job_id: int) -> tuple[int, int]:
    """Checks every chunk's counts and sums against its results counted the slow way (sample-0
    rows of its requests; output tokens of every sample; NULL while open); returns the job's
    (succeeded, failed) over closed chunks."""
    ok = bad = 0
    with db.session() as s:
        for chunk in s.scalars(select(Chunk).where(Chunk.job_id == job_id)):
            rows = s.execute(
                select(
                    Result.sample_index,
                    Result.status,
                    Result.deduplicated,
                    Result.input_tokens,
                    Result.output_tokens,
                )
                .join(Request, Request.id == Result.request_id)
                .where(Request.chunk_id == chunk.id)
            ).all()
            first = [r for r in rows if r.sample_index == 0]
            counts = (
                chunk.requests_succeeded,
                chunk.requests_failed,
                chunk.requests_deduplicated,
                chunk.input_tokens,
                chunk.output_tokens,
            )
            if chunk.status in ChunkStatus.closed():
                assert counts == (
                    sum(r.status == "succeeded" for r in first),
                    sum(r.status == "failed" for r in first),
                    sum(bool(r.deduplicated) for r in first),
                    sum(r.input_tokens or 0 for r in first),
                    sum(r.output_tokens or 0 for r in rows),
                ), chunk.seq
                ok, bad = ok + counts[0], bad + counts[1]  # type: ignore[operator]
            else:
                assert counts == (None,) * 5, chunk.seq
    return ok, bad


def _slow_tokens(db: Database, job_id: int) -> tuple[int, int, int]:
    """(input tokens of sample 0, output tokens of every sample, deduplicated requests) of the
    job's closed chunks, summed over their results."""
    with db.session() as s:
        tin, tout, dedup = s.execute(
            select(
                func.coalesce(func.sum(case((Result.sample_index == 0, Result.input_tokens), else_=0)), 0),
                func.coalesce(func.sum(Result.output_tokens), 0),
                func.count().filter(Result.sample_index == 0, Result.deduplicated.is_(True)),
            )
            .join(Request, Request.id == Result.request_id)
            .join(Chunk, Chunk.id == Request.chunk_id)
            .where(Result.job_id == job_id, Chunk.status.in_(ChunkStatus.closed()))
        ).one()
    return int(tin), int(tout), int(dedup)


def _job(db: Database, tmp_path: Path, n: int) -> int:
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", translate_rows(n)), "translate", chunk_size=4)
    start_due_jobs(db, utcnow())
    return job_id


def _chunk_ids(db: Database, job_id: int) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)))


def _add_result(
    db: Database, chunk_id: int, *, index: int = 0, sample: int = 0, status: str = "succeeded"
) -> None:
    """A result row for the ``index``-th request of the chunk, written as a worker would."""
    with db.session() as s:
        req = s.scalars(
            select(Request).where(Request.chunk_id == chunk_id).order_by(Request.line_number)
        ).all()[index]
        s.add(
            Result(
                job_id=req.job_id,
                request_id=req.id,
                sample_index=sample,
                status=status,
                output_text="x" if status == "succeeded" else None,
                error=None if status == "succeeded" else "ValueError: written by hand",
                input_tokens=1,
                output_tokens=1,
                created_at=utcnow(),
            )
        )


def test_counts_follow_close_and_retry(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 10)
    run_job_locally(db, job_id, generate=_fail_every_third, ctx=FAKE_CTX)
    ok, bad = _slow_counts(db, job_id)
    assert bad > 0 and ok + bad == 10
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending, st.status) == (ok, bad, 0, "completed_with_failures")
    assert sum(st.failures_by_reason.values()) == st.failures_counted == bad
    assert st.chunks == {"done": 3}

    assert retry_job(db, job_id) == bad  # reopens the chunks with a failed request: counts NULL
    assert None in _chunk_counts(db, job_id)
    st = job_status(db, job_id)
    reopened = st.chunks.get("pending", 0)
    assert reopened >= 1 and (st.failed, st.pending) == (0, 10 - st.succeeded)
    assert st.succeeded == _slow_counts(db, job_id)[0] < ok

    run_job_locally(db, job_id, generate=FakeEngine(), ctx=FAKE_CTX)
    assert _slow_counts(db, job_id) == (10, 0)
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending, st.status) == (10, 0, 0, "completed")


def _chunk_counts(db: Database, job_id: int) -> list[int | None]:
    with db.session() as s:
        return list(
            s.scalars(select(Chunk.requests_succeeded).where(Chunk.job_id == job_id).order_by(Chunk.seq))
        )


def test_a_lease_that_expires_reopens_the_chunk_and_the_next_close_counts_what_was_written(
    db_url: str, tmp_path: Path
) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 4)
    (chunk_id,) = _chunk_ids(db, job_id)
    with db.session() as s:
        assert claim_chunk(s, chunk_id, worker="dies", lease_seconds=1) == 1
    _add_result(db, chunk_id, index=0, status="failed")  # recorded alone before the worker died
    assert requeue_expired_leases(db, utcnow() + timedelta(seconds=5)) == 1
    _slow_counts(db, job_id)  # open again: NULL counts
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending) == (0, 0, 4)  # an open chunk's rows are pending

    out = process_chunk(db, chunk_id, generate=FakeEngine(), ctx=FAKE_CTX)
    assert out.claimed and out.skipped == 1 and out.succeeded == 3
    assert _slow_counts(db, job_id) == (3, 1)
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending, st.status) == (3, 1, 0, "completed_with_failures")


def test_give_up_and_isolated_records_are_counted_at_the_close(db_url: str, tmp_path: Path) -> None:
    """Past the attempt cap each request runs alone and is committed on its own; the one that
    crashed its worker every time is failed without running. The close counts them all."""
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 4)
    (chunk_id,) = _chunk_ids(db, job_id)
    with db.session() as s:
        s.execute(update(Chunk).where(Chunk.id == chunk_id).values(attempts=FAKE_CTX.max_attempts))
        first = s.scalar(select(func.min(Request.id)).where(Request.chunk_id == chunk_id))
        s.execute(update(Request).where(Request.id == first).values(isolated_attempts=FAKE_CTX.max_attempts))
    out = process_chunk(db, chunk_id, generate=FakeEngine(), ctx=FAKE_CTX)
    assert (out.isolated_succeeded, out.isolated_failed) == (3, 1)
    assert _slow_counts(db, job_id) == (3, 1)
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending) == (3, 1, 0)
    assert list(st.failures_by_reason) == [
        f"gave up after {FAKE_CTX.max_attempts} isolated attempts: this request crashed the worker each time"
    ]


def test_cancel_counts_what_its_waiting_chunks_already_hold(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 12)
    first, second, third = _chunk_ids(db, job_id)
    assert process_chunk(db, first, generate=_fail_every_third, ctx=FAKE_CTX).claimed
    with db.session() as s:
        claim_chunk(s, second, worker="dies", lease_seconds=1)
    _add_result(db, second, index=2)
    requeue_expired_leases(db, utcnow() + timedelta(seconds=5))
    assert cancel_job(db, job_id) == 2
    ok, bad = _slow_counts(db, job_id)
    assert ok + bad == 5 and _chunk_counts(db, job_id)[1:] == [1, 0]
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending, st.status) == (ok, bad, 7, "cancelled")
    assert st.chunks == {"done": 1, "cancelled": 2}

    assert retry_job(db, job_id) == bad  # the cancelled chunks reopen with the failed one's
    _slow_counts(db, job_id)
    run_job_locally(db, job_id, generate=FakeEngine(), ctx=FAKE_CTX)
    assert _slow_counts(db, job_id) == (12, 0)
    assert job_status(db, job_id).status == "completed"


def test_a_request_with_several_samples_counts_once(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 4)
    (chunk_id,) = _chunk_ids(db, job_id)
    for i in range(4):
        for sample in range(3):
            _add_result(db, chunk_id, index=i, sample=sample, status="failed" if i == 3 else "succeeded")
    with db.session() as s:
        claim_chunk(s, chunk_id, worker="w", lease_seconds=60)
        assert close_chunk(s, chunk_id, worker="w")
    assert _slow_counts(db, job_id) == (3, 1)
    assert finalize_job_if_done(db, job_id) == "completed_with_failures"
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending, st.failures_counted) == (3, 1, 0, 1)
    assert st.failures_by_reason == {"ValueError: written by hand": 1}
    # a prompt counts once (sample 0), every sample's output counts
    assert (st.input_tokens, st.output_tokens) == (4, 12) == _slow_tokens(db, job_id)[:2]
    rep = build_report(db, job_id)
    assert (rep.totals.succeeded, rep.totals.failed, rep.totals.pending) == (3, 1, 0)
    assert rep.failures == [("ValueError: written by hand", 1)]


def test_chunks_closed_before_counts_were_kept_are_counted_from_their_results(
    db_url: str, tmp_path: Path
) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 10)
    run_job_locally(db, job_id, generate=_fail_every_third, ctx=FAKE_CTX)
    ok, bad = _slow_counts(db, job_id)
    before = job_status(db, job_id)
    with db.session() as s:  # an older version closed the first two chunks
        s.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.seq < 2)
            .values(
                requests_succeeded=None,
                requests_failed=None,
                requests_deduplicated=None,
                input_tokens=None,
                output_tokens=None,
            )
        )
        # and the third closed with counts but without token sums
        s.execute(update(Chunk).where(Chunk.job_id == job_id, Chunk.seq == 2).values(output_tokens=None))
    after = job_status(db, job_id)
    assert (
        (after.succeeded, after.failed, after.pending) == (before.succeeded, before.failed, 0) == (ok, bad, 0)
    )
    tokens = (before.input_tokens, before.output_tokens, before.deduplicated)
    assert tokens == (after.input_tokens, after.output_tokens, after.deduplicated) == _slow_tokens(db, job_id)
    assert after.output_tokens > 0
    (listed,) = [j for j in list_jobs(db) if j.id == job_id]
    assert (listed.succeeded, listed.failed) == (ok, bad)
    rep = build_report(db, job_id)
    assert (rep.totals.succeeded, rep.totals.failed) == (ok, bad)


def test_list_reads_every_job_of_the_page_in_one_query_over_chunks(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    jobs = []
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        jobs.append(_job(db, tmp_path / str(i), 4 + i))
        run_job_locally(db, jobs[-1], generate=FakeEngine(), ctx=FAKE_CTX)
    with _statements(db) as seen:
        listed = list_jobs(db, limit=20)
    assert [(j.id, j.succeeded, j.pending) for j in listed] == [
        (j, 4 + i, 0) for i, j in reversed(list(enumerate(jobs)))
    ]
    assert sum("FROM chunks" in st for st, _ in seen) == 1
    assert not any("results" in st for st, _ in seen)  # no failures: the reasons are not read
    for j in listed:  # the token sums come with the counts, from the same query
        assert (j.input_tokens, j.output_tokens, j.deduplicated) == _slow_tokens(db, j.id)
        assert j.input_tokens > 0


@contextmanager
def _statements(db: Database) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        seen.append((statement, params))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def _shape(statements: list[tuple[str, Any]]) -> list[str]:
    return [re.sub(r"\s+", " ", st) for st, _ in statements if " FROM " in re.sub(r"\s+", " ", st).upper()]


def test_a_watch_refresh_issues_the_same_few_statements_whatever_the_size_of_the_job(
    db_url: str, tmp_path: Path
) -> None:
    """Each refresh of ``status --watch`` reads the job row and its chunks (and, when some
    failed, a LIMITed sample of failed results): the same statements for 8 and 40 requests,
    none of them a count or sum over ``results``."""
    db = get_database(db_url)
    shapes = []
    for n in (8, 40):
        (tmp_path / str(n)).mkdir()
        job_id = _job(db, tmp_path / str(n), n)
        run_job_locally(db, job_id, generate=_fail_every_third, ctx=FAKE_CTX)
        with _statements(db) as seen:
            st = job_status(db, job_id, tokens=False)
        assert st.failed == _slow_counts(db, job_id)[1] > 0 and st.scores == {}
        assert (st.input_tokens, st.output_tokens, st.deduplicated) == _slow_tokens(db, job_id)
        shapes.append(_shape(seen))
    assert shapes[0] == shapes[1]
    assert len(shapes[0]) == 4, shapes[0]  # job, chunks, failed sample: its size, its reasons
    on_results = [st for st in shapes[0] if "results" in st]
    assert len(on_results) == 2 and all("LIMIT" in st for st in on_results)


def test_the_failure_reasons_are_counted_over_a_bounded_sample(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path, 12)
    run_job_locally(db, job_id, generate=_fail_every_third, ctx=FAKE_CTX)
    assert FAILURE_SAMPLE >= 1000
    monkeypatch.setattr("lmjobs.jobs.control.FAILURE_SAMPLE", 2)
    st = job_status(db, job_id)
    assert (st.failed, st.failures_counted, sum(st.failures_by_reason.values())) == (4, 2, 2)
    # the report's "(other)" holds the failures outside the sample's top reasons
    rep = _failures(db, job_id, st.failed)
    assert sum(n for _, n in rep) == 4 and rep[-1][0] == "(other)"


def test_deduplicated_requests_are_summed_at_the_close(db_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"  # 4 distinct prompts, each 5 times, over chunks of 3
    src.write_text("".join(json.dumps({"prompt": f"same words {i % 4}"}) + "\n" for i in range(20)))
    db = get_database(db_url)
    job_id = create_job(db, src, SubmitOptions(task="generate", model="fake", chunk_size=3)).job_id
    run_job_locally(db, job_id, generate=FakeEngine(), ctx=FAKE_CTX)
    assert _slow_counts(db, job_id) == (20, 0)
    st = job_status(db, job_id)
    assert (st.input_tokens, st.output_tokens, st.deduplicated) == _slow_tokens(db, job_id)
    assert st.deduplicated == 16


def test_mean_scores_are_exact_for_a_small_job_and_sampled_above_the_limit(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = get_database(db_url)
    job_id = build_job(db, 3000)  # 28 closed chunks of 64, a rouge_l score per succeeded request
    st = job_status(db, job_id)
    assert st.scores == mean_scores(db, job_id) and not st.scores_sampled
    monkeypatch.setattr("lmjobs.jobs.control.SCORE_EXACT_LIMIT", 100)
    monkeypatch.setattr("lmjobs.jobs.control.SAMPLE_REQUESTS", 320)  # 5 chunks of the 28
    st = job_status(db, job_id)
    assert st.scores_sampled and set(st.scores) == {"rouge_l"}
    with db.session() as s:  # the sample: every 6th (ceil(28 / 5)) closed chunk by seq, their scores
        chunks = list(
            s.scalars(
                select(Chunk.id).where(Chunk.job_id == job_id, Chunk.status == "done", Chunk.seq % 6 == 0)
            )
        )
        values = list(
            s.scalars(
                select(Score.value)
                .join(Request, Request.id == Score.request_id)
                .where(Request.chunk_id.in_(chunks))
            )
        )
    assert len(chunks) == 5 and st.scores_sample_requests == len(values) > 300
    assert st.scores["rouge_l"] == pytest.approx(sum(values) / len(values))
    env_scores = job_status(db, job_id, tokens=False)
    assert env_scores.scores == {} and not env_scores.scores_sampled


def test_status_watch_refuses_an_interval_that_would_load_the_database(
    lmjobs_home: Path, tmp_path: Path
) -> None:
    env = cli_env(LMJOBS_HOME=str(lmjobs_home))
    proc = run_cli(["status", "1", "--watch", "--interval", "0"], env)
    assert proc.returncode == 2, proc.stderr
    assert "--interval must be at least 0.2 seconds (got 0.0)" in proc.stderr


@pytest.mark.postgres
def test_status_list_and_report_counts_do_not_scan_results_on_postgresql(postgres_url: str) -> None:
    """EXPLAIN every statement that status, list and the report's counts issue on a job of
    2,000 requests beside one of 100,000: chunks are read through their job index, results
    only through (job_id, status) under a LIMIT; no Seq Scan on either."""
    db = get_database(postgres_url)
    build_job(db, 100_000)
    job_id = build_job(db, 2_000)
    calls: list[Callable[[], Any]] = [
        lambda: job_status(db, job_id, tokens=False),
        lambda: list_jobs(db, limit=1),  # the page: the small job
        lambda: _report_counts(db, job_id),
    ]
    for call in calls:
        with _statements(db) as seen:
            call()
        assert seen
        with db.engine.connect() as conn:
            for statement, params in seen:
                if "chunks" not in statement and "results" not in statement:
                    continue
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
                assert "Seq Scan on results" not in plan, plan
                assert "Seq Scan on chunks" not in plan, plan
                if "results" in statement:
                    assert "Limit" in plan and " on results" in plan, plan
                if "FROM chunks" in statement:
                    assert "ix_chunks_job_id" in plan, plan


@pytest.mark.postgres
def test_status_list_and_a_sampled_report_read_results_only_in_bounded_ranges_on_postgresql(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXPLAIN every statement of the one-shot ``status`` (tokens, mean scores from a sample),
    ``list`` and a ``report`` above the sample size, on a job of 3,000 requests beside one of
    100,000: no Seq Scan on chunks, requests, results or scores; the sample's requests through
    ``ix_requests_chunk``, results and scores only under a LIMIT or looked up by their unique
    keys (``control.keyed_rows``); a sample costs a few statements, not one a chunk."""
    monkeypatch.setattr("lmjobs.jobs.control.SAMPLE_REQUESTS", 640)
    monkeypatch.setattr("lmjobs.jobs.report.SAMPLE_REQUESTS", 640)
    monkeypatch.setattr("lmjobs.jobs.control.SCORE_EXACT_LIMIT", 100)
    # The keys a statement looks up, scaled with the sample (production: 1,000 of 12,800 over
    # tables of a 1M-request job, where PostgreSQL plans them as index lookups too).
    monkeypatch.setattr("lmjobs.jobs.control.KEYS_PER_STATEMENT", 50)
    db = get_database(postgres_url)
    build_job(db, 100_000)
    job_id = build_job(db, 3_000)
    st = job_status(db, job_id)
    assert st.scores_sampled and st.output_tokens == 12 * (st.succeeded + st.failed)
    rep = build_report(db, job_id)
    assert (
        rep.sample is not None
        and rep.sample.chunks == 10
        and {"latency", "scores"} <= set(rep.sample.figures)
    )
    calls: list[Callable[[], Any]] = [
        lambda: job_status(db, job_id),
        lambda: list_jobs(db, limit=1),
        lambda: build_report(db, job_id),
    ]
    checked: set[str] = set()
    for call in calls:
        with _statements(db) as seen:
            call()
        assert len(seen) <= 40, [st for st, _ in seen]  # the sample: 10 chunks, ~640 requests
        with db.engine.connect() as conn:
            for statement, params in seen:
                tables = {t for t in ("chunks", "requests", "results", "scores") if f" {t}" in statement}
                if not tables:
                    continue
                checked |= tables
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
                for t in ("chunks", "requests", "results", "scores"):
                    assert f"Seq Scan on {t}" not in plan, plan
                if tables & {"results", "scores"}:  # under a LIMIT, or looked up by their unique keys
                    assert "Limit" in plan or re.search(
                        r"Index Scan using uq_(results_job_request_sample|scores_request_metric) .*\n"
                        r"\s+Index Cond: .*request_id = ANY ",
                        plan,
                    ), plan
                if "FROM requests" in statement:
                    assert "ix_requests_chunk" in plan or "requests_pkey" in plan, plan
                if "FROM chunks" in statement:
                    assert "ix_chunks_job_id" in plan or "uq_chunks_job_seq" in plan, plan
    assert checked == {"chunks", "requests", "results", "scores"}


def _report_counts(db: Database, job_id: int) -> None:
    with db.session() as s:
        p = job_progress(s, [job_id])[job_id]
    assert p.failed > 0
    assert _failures(db, job_id, p.failed)


def test_build_job_writes_the_counts_its_results_give(db_url: str) -> None:
    """The benchmark's job (bench/follow.py) is what workers would have written."""
    db = get_database(db_url)
    job_id = build_job(db, 1000)
    ok, bad = _slow_counts(db, job_id)
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed, st.pending) == (ok, bad, 1000 - ok - bad)
    assert bad == sum(1 for line in range(1, 9 * 64 + 1) if line % 50 == 0)
    assert st.chunks == {"done": 9, "running": 1, "pending": 6}
    assert sum(st.failures_by_reason.values()) == bad and len(st.failures_by_reason) == 3


def test_progress_reads_the_span_of_the_closed_chunks_in_its_one_pass(db_url: str) -> None:
    """``first_started`` / ``last_finished``: the earliest start and the latest finish of the
    closed chunks that finished (the span of a big job's throughput in ``report``); a running
    chunk's start and a pending one's nothing do not count."""
    db = get_database(db_url)
    job_id = build_job(db, 1000)  # 9 done chunks, 1 running, 6 pending
    with db.session() as s:
        s.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.status == "running")
            .values(started_at=utcnow() - timedelta(days=3))
        )
        done = s.execute(
            select(func.min(Chunk.started_at), func.max(Chunk.finished_at)).where(
                Chunk.job_id == job_id, Chunk.status == "done"
            )
        ).one()
        p = job_progress(s, [job_id])[job_id]
    assert done[0] is not None and done[1] is not None
    assert (p.first_started, p.last_finished) == tuple(done)
    with db.session() as s:
        s.execute(update(Chunk).where(Chunk.job_id == job_id).values(status="pending", finished_at=None))
        p = job_progress(s, [job_id])[job_id]
    assert (p.first_started, p.last_finished) == (None, None)
