"""Leases and engine faults in the chunk service, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from analytics_data import FAKE_CTX, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from sqlalchemy import event, func, select

from lmjobs.db.models import Chunk, ChunkStatus, JobStatus, Result, utcnow
from lmjobs.db.session import get_database
from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.control import job_status
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest
from lmjobs.jobs.faults import engine_fault, is_fault_text
from lmjobs.jobs.lifecycle import requeue_expired_leases, retry_job, start_due_jobs


def test_a_recording_commit_that_stalls_past_the_lease_does_not_let_another_worker_in(
    db_url: str, tmp_path: Path
) -> None:
    """Worker A's INSERT of results stalls for 2.5 leases; worker B and the reconciler try to
    take the chunk all the while. A's lease keeper runs through the recording, so the chunk
    is claimed once and every request is generated once."""
    db = get_database(db_url)
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", translate_rows(4)), "translate", chunk_size=4)
    start_due_jobs(db, utcnow())
    with db.session() as s:
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job_id))
    calls = tmp_path / "calls.txt"
    engine = FakeEngine(calls_file=str(calls))
    lease_s, stall_s = 2, 5.0
    ctx_a = replace(FAKE_CTX, worker="worker-a", lease_seconds=lease_s, heartbeat_seconds=0.4)
    ctx_b = replace(ctx_a, worker="worker-b")

    stalled = threading.Event()

    def stall_results_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO RESULTS") and not stalled.is_set():
            stalled.set()
            time.sleep(stall_s)

    event.listen(db.engine, "before_cursor_execute", stall_results_insert)
    outcome_a: list[Any] = []
    try:
        thread = threading.Thread(
            target=lambda: outcome_a.append(process_chunk(db, chunk_id, generate=engine, ctx=ctx_a))
        )
        thread.start()
        assert stalled.wait(30), "worker A never reached its recording step"
        others = []
        while thread.is_alive():  # the whole stall, well past the lease
            requeue_expired_leases(db, utcnow())
            others.append(process_chunk(db, chunk_id, generate=engine, ctx=ctx_b))
            time.sleep(0.3)
        thread.join()
    finally:
        event.remove(db.engine, "before_cursor_execute", stall_results_insert)

    assert len(others) >= stall_s / 0.3 / 2  # B really tried, many times
    assert not any(o.claimed for o in others)
    assert outcome_a[0].claimed and not outcome_a[0].lease_lost and outcome_a[0].succeeded == 4
    assert sorted(calls.read_text().split()) == sorted(set(calls.read_text().split()))  # once each
    assert len(calls.read_text().split()) == 4
    with db.session() as s:
        chunk = s.get(Chunk, chunk_id)
        assert chunk is not None and chunk.attempts == 1 and chunk.status == ChunkStatus.DONE.value
        assert s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 4


def _failing(error: str) -> Any:
    def generate(requests: Sequence[GenRequest]) -> list[Generation]:
        return [Generation(r.key, "", FinishReason.ERROR, 3, 0, 1.0, error=error) for r in requests]

    return generate


FAULT = "AttributeError: 'DynamicLayer' object has no attribute 'dtype'"


def test_an_engine_fault_on_every_request_stops_the_job_with_one_error(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", translate_rows(10)), "translate", chunk_size=4)
    start_due_jobs(db, utcnow())
    run_job_locally(db, job_id, generate=_failing(FAULT), ctx=FAKE_CTX)

    st = job_status(db, job_id)
    assert st.status == JobStatus.FAILED.value
    assert st.error == f"engine fault: {FAULT}"
    assert (st.succeeded, st.failed) == (0, 0)  # no row blames the data
    assert st.pending == 10
    assert st.chunks == {"cancelled": 3}  # the first chunk was given back, then all cancelled

    # Once the engine is fixed, `retry` runs the whole job.
    assert retry_job(db, job_id) == 0
    run_job_locally(db, job_id, generate=FakeEngine(), ctx=FAKE_CTX)
    st = job_status(db, job_id)
    assert (st.status, st.succeeded) == (JobStatus.COMPLETED.value, 10)


def test_a_request_error_on_every_request_is_still_each_requests_own(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", translate_rows(4)), "translate", chunk_size=4)
    start_due_jobs(db, utcnow())
    error = "ValueError: the prompt has 9000 tokens; the model's context is 8192"
    run_job_locally(db, job_id, generate=_failing(error), ctx=FAKE_CTX)
    st = job_status(db, job_id)
    assert (st.status, st.error, st.failed) == (JobStatus.FAILED.value, None, 4)
    assert st.failures_by_reason == {error: 4}


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (FAULT, True),
        ("ImportError: cannot import name 'X' from 'transformers'", True),
        ("RuntimeError: CUDA error: an illegal memory access was encountered", True),
        ("RuntimeError: CUDA error: no kernel image is available for execution", True),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", False),
        ("out of memory even alone in a batch: RuntimeError: CUDA out of memory", False),
        ("ValueError: prompt too long", False),
        ("invalid request: no target language", False),
        ("cannot render the request: the template needs a user turn", False),
    ],
)
def test_which_errors_are_engine_faults(error: str, fault: bool) -> None:
    assert is_fault_text(error) is fault


def _row(status: str, error: str | None, deduplicated: bool = False) -> dict[str, Any]:
    return {"status": status, "error": error, "deduplicated": deduplicated}


def test_a_fault_needs_every_row_failed_the_same_way() -> None:
    assert engine_fault([_row("failed", FAULT), _row("failed", FAULT)]) == FAULT
    assert engine_fault([_row("failed", FAULT), _row("succeeded", None)]) is None
    assert engine_fault([_row("failed", FAULT), _row("failed", "ImportError: x")]) is None
    assert engine_fault([]) is None
