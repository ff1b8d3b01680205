"""Priorities order dispatch; a deadline pauses a job cleanly and `resume` finishes it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from analytics_data import FAKE_CTX, run, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from sqlalchemy import func, select

from lmjobs.db.models import Chunk, JobStatus, Result
from lmjobs.db.session import get_database
from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.control import job_status
from lmjobs.jobs.dispatch import ChunkMessage, dispatch
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.engine_api import Generation, GenRequest
from lmjobs.jobs.lifecycle import resume_job
from lmjobs.jobs.reconcile import tick


def test_higher_priority_job_is_dispatched_first(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    path = write_jsonl(tmp_path / "in.jsonl", translate_rows(8))
    bulk = submit(db, path, "translate", priority=0, chunk_size=2)  # submitted first
    urgent = submit(db, path, "translate", priority=5, chunk_size=2)
    sent: list[ChunkMessage] = []

    assert dispatch(db, sent.append, window=100) == 8
    assert [m.job_id for m in sent] == [urgent] * 4 + [bulk] * 4
    assert all(m.priority < n.priority for m in sent[:4] for n in sent[4:])  # Redis: 0 first

    # With room for only three messages, all three go to the urgent job.
    db2 = get_database(db_url)
    with db2.session() as s:
        s.execute(Chunk.__table__.update().values(status="pending", dispatched_at=None))
    sent.clear()
    assert dispatch(db2, sent.append, window=3) == 3
    assert {m.job_id for m in sent} == {urgent}


def test_deadline_pauses_and_resume_finishes_without_duplicates(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    calls = tmp_path / "calls.txt"
    engine = FakeEngine(calls_file=str(calls))
    # Closer than the lease (300 s), so the injected tick sees the running chunk's lease alive.
    deadline = datetime.now(timezone.utc) + timedelta(minutes=2)
    job_id = submit(
        db,
        write_jsonl(tmp_path / "in.jsonl", translate_rows(8)),
        "translate",
        chunk_size=2,
        finish_by=deadline,
    )
    with db.session() as s:
        q = select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)
        chunk_ids = list(s.scalars(q))
    assert len(chunk_ids) == 4
    sent: list[ChunkMessage] = []
    tick(db, sent.append, now=deadline - timedelta(minutes=1))  # before: normal dispatch
    assert len(sent) == 4

    assert process_chunk(db, chunk_ids[0], generate=engine, ctx=FAKE_CTX).succeeded == 2

    paused: list[int] = []

    def deadline_strikes_mid_chunk(requests: Sequence[GenRequest]) -> list[Generation]:
        paused.extend(tick(db, None, now=deadline).paused)  # beat runs while we generate
        return engine(requests)

    out = process_chunk(db, chunk_ids[1], generate=deadline_strikes_mid_chunk, ctx=FAKE_CTX)
    assert paused == [job_id]
    assert out.succeeded == 2 and not out.lease_lost  # the running chunk finished
    st = job_status(db, job_id)
    assert (st.status, st.succeeded, st.pending) == (JobStatus.PAUSED.value, 4, 4)
    assert st.chunks == {"done": 2, "pending": 2}

    # Paused: redelivered messages do nothing, dispatch sends nothing, a local run stops.
    assert not process_chunk(db, chunk_ids[2], generate=engine, ctx=FAKE_CTX).claimed
    sent.clear()
    assert dispatch(db, sent.append, now=deadline + timedelta(minutes=1)) == 0
    run_job_locally(db, job_id, generate=engine, ctx=FAKE_CTX)
    assert job_status(db, job_id).pending == 4

    assert resume_job(db, job_id) == 4
    assert tick(db, None, now=deadline + timedelta(minutes=2)).paused == []  # deadline cleared
    run(db, job_id, engine)
    st = job_status(db, job_id)
    assert (st.status, st.succeeded, st.failed, st.pending) == (JobStatus.COMPLETED.value, 8, 0, 0)
    with db.session() as s:
        n = s.scalar(select(func.count()).where(Result.job_id == job_id))
        distinct = s.scalar(
            select(func.count(func.distinct(Result.request_id))).where(Result.job_id == job_id)
        )
    assert n == distinct == 8
    keys = calls.read_text().split()
    assert len(keys) == len(set(keys)) == 8  # nothing generated twice
