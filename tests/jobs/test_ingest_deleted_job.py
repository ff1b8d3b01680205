"""A submit whose job is deleted while it writes (``lmjobs cleanup`` or another submit of the
same file took it for an abandoned one, or an operator's DELETE) stops with one clear line
and leaves nothing of the job: neither the batches written before nor the one in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from analytics_data import write_jsonl
from sqlalchemy import text

from lmjobs.db.session import get_database
from lmjobs.jobs import ingest
from lmjobs.jobs.errors import UnknownJobError
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.lifecycle import discard_job
from lmjobs.jobs.submit import SubmitOptions

pytestmark = pytest.mark.timeout(120)

TABLES = ("jobs", "requests", "chunks", "rejects")
OPTS = SubmitOptions(task="summarize", model="m", chunk_size=4, ingest_processes=0)


def _file(tmp_path: Path) -> Path:
    rows: list[Any] = [{"id": f"r{i}", "text": f"text {i}"} for i in range(60)]
    rows[7] = "not json"  # a reject, written with the batches
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _counts(url: str) -> dict[str, int]:
    with get_database(url).engine.connect() as conn:
        return {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES}


def _delete_job(url: str, how: str) -> None:
    db = get_database(url)
    with db.engine.connect() as conn:
        job_id = int(conn.execute(text("SELECT max(id) FROM jobs")).scalar_one())
    if how == "sql":
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job_id})
    else:
        discard_job(db, job_id)


def _many_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 200)  # a block every few lines
    monkeypatch.setattr(ingest, "FLUSH_ROWS", 8)  # a transaction every 8 rows


def _refused(url: str, path: Path, delete_at: int, how: str) -> str:
    calls = 0

    def on_progress(bytes_read: int, lines: int, rejected: int) -> None:
        nonlocal calls
        calls += 1
        if calls == delete_at:
            _delete_job(url, how)

    with pytest.raises(UnknownJobError) as caught:
        create_job(get_database(url), path, OPTS, on_progress=on_progress)
    return str(caught.value)


@pytest.mark.parametrize("how", ["sql", "discard_job"])
def test_a_job_deleted_between_batches_stops_the_submit(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    _many_batches(monkeypatch)
    path = _file(tmp_path)
    message = _refused(db_url, path, delete_at=4, how=how)  # some batches are written by then
    assert "was deleted while its file was being submitted" in message and "\n" not in message
    assert _counts(db_url) == dict.fromkeys(TABLES, 0)


def test_a_job_deleted_after_its_last_batch_is_not_marked_ready(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _many_batches(monkeypatch)
    path = _file(tmp_path)
    blocks = sum(1 for _ in ingest.line_ranges(path, ingest.BLOCK_BYTES))
    # the last progress call comes after the last batch, before the job is marked ready
    message = _refused(db_url, path, delete_at=blocks + 1, how="sql")
    assert "was deleted while its file was being submitted" in message
    assert _counts(db_url) == dict.fromkeys(TABLES, 0)


@pytest.mark.postgres
def test_a_delete_that_meets_a_batch_in_flight_waits_for_it_then_takes_everything(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete arrives while a batch's transaction is open: it waits for the batch (the
    job is held FOR KEY SHARE), then deletes its requests with the rest; the next batch
    finds the job gone."""
    _many_batches(monkeypatch)
    path = _file(tmp_path)
    engine = get_database(postgres_url).engine
    copy_insert = ingest.copy_insert
    batches: list[int] = []
    deleter: list[threading.Thread] = []

    def copy_then_delete(*args: Any, **kwargs: Any) -> int:
        inserted = copy_insert(*args, **kwargs)
        batches.append(inserted)
        if len(batches) == 2:  # the second batch: the first is committed, this one is not
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM requests")).scalar_one() == batches[0]
            thread = threading.Thread(target=_delete_job, args=(postgres_url, "sql"))
            thread.start()
            deleter.append(thread)
            deadline = time.monotonic() + 30
            while not _a_delete_waits(postgres_url):
                assert thread.is_alive() and time.monotonic() < deadline
                time.sleep(0.02)
        return inserted

    monkeypatch.setattr(ingest, "copy_insert", copy_then_delete)
    with pytest.raises(UnknownJobError, match="was deleted while its file was being submitted"):
        create_job(get_database(postgres_url), path, OPTS)
    deleter[0].join(30)
    assert len(batches) == 2  # the third batch found the job gone before writing anything
    assert _counts(postgres_url) == dict.fromkeys(TABLES, 0)


def _a_delete_waits(url: str) -> bool:
    with get_database(url).engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'DELETE FROM jobs%'"
                )
            ).scalar()
        )
