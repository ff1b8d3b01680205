"""Overnight runs with injected time: `--start-at` jobs and recurring cron schedules."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from analytics_data import submit, translate_rows, write_jsonl
from sqlalchemy import func, select

from lmjobs.db.models import Job, JobStatus
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.dispatch import ChunkMessage
from lmjobs.jobs.reconcile import tick
from lmjobs.jobs.schedules import (
    ScheduleError,
    add_schedule,
    list_schedules,
    next_run,
    remove_schedule,
    run_due_schedules,
)

UTC = timezone.utc
T0 = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)


def _file(tmp_path: Path, n: int = 5) -> Path:
    return write_jsonl(tmp_path / "nightly.jsonl", translate_rows(n))


def _jobs(db: Database) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


# -- --start-at ---------------------------------------------------------------------------


def test_scheduled_job_dispatches_at_its_time_and_not_before(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
    job_id = submit(db, _file(tmp_path), "translate", start_at=start)
    assert _jobs(db)[0].status == JobStatus.SCHEDULED.value
    sent: list[ChunkMessage] = []

    rep = tick(db, sent.append, now=start - timedelta(seconds=1))
    assert rep.started == [] and rep.dispatched == 0 and sent == []
    assert _jobs(db)[0].status == JobStatus.SCHEDULED.value

    rep = tick(db, sent.append, now=start)
    assert rep.started == [job_id]
    assert {m.job_id for m in sent} == {job_id} and len(sent) == 2  # 5 requests, chunks of 4
    assert _jobs(db)[0].status == JobStatus.QUEUED.value


# -- recurring schedules ------------------------------------------------------------------


def test_cron_schedule_creates_jobs_on_time_and_not_before(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    sid = add_schedule(
        db,
        "0 2 * * *",
        _file(tmp_path),
        "translate",
        {"priority": 3, "chunk_size": 2},
        model="fake",
        name="nightly",
        tz="UTC",
        finish_within_s=3600,
        now=T0,
    )
    (info,) = list_schedules(db)
    assert info.id == sid and info.timezone == "UTC"
    assert info.next_run_at == datetime(2026, 1, 1, 2, 0, tzinfo=UTC)

    assert tick(db, None, now=datetime(2026, 1, 1, 1, 59, 59, tzinfo=UTC)).scheduled == []
    assert _jobs(db) == []

    at = datetime(2026, 1, 1, 2, 0, 5, tzinfo=UTC)
    (job_id,) = tick(db, None, now=at).scheduled
    (job,) = _jobs(db)
    assert (job.id, job.schedule_id, job.priority, job.status) == (job_id, sid, 3, "queued")
    assert job.chunks_total == 3 and job.finish_by == at + timedelta(hours=1)
    assert job.name == "nightly @ 2026-01-01 02:00Z"
    assert tick(db, None, now=at).scheduled == []  # the same tick again: nothing twice
    assert tick(db, None, now=datetime(2026, 1, 1, 23, 0, tzinfo=UTC)).scheduled == []

    (info,) = list_schedules(db)
    assert info.next_run_at == datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    assert (info.last_run_at, info.last_job_id) == (at, job_id)

    # Beat down for three nights: one job, not three, and the next run is tomorrow.
    late = datetime(2026, 1, 5, 3, 0, tzinfo=UTC)
    assert len(run_due_schedules(db, None, late)) == 1
    assert list_schedules(db)[0].next_run_at == datetime(2026, 1, 6, 2, 0, tzinfo=UTC)
    assert len(_jobs(db)) == 2


def test_concurrent_ticks_create_one_job(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    add_schedule(db, "*/15 * * * *", _file(tmp_path), "translate", model="fake", tz="UTC", now=T0)
    at = datetime(2026, 1, 1, 0, 45, tzinfo=UTC)
    barrier = threading.Barrier(4)
    created: list[int] = []

    def one_tick() -> None:
        barrier.wait()
        created.extend(run_due_schedules(db, None, at))

    threads = [threading.Thread(target=one_tick) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
    assert len(created) == 1


def test_a_missing_file_skips_the_run_and_the_schedule_moves_on(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    path = _file(tmp_path)
    add_schedule(db, "@hourly", path, "translate", model="fake", tz="UTC", now=T0)
    path.unlink()
    assert run_due_schedules(db, None, datetime(2026, 1, 1, 1, 0, tzinfo=UTC)) == []
    assert list_schedules(db)[0].next_run_at == datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    write_jsonl(path, translate_rows(2))  # rewritten before the next run
    assert len(run_due_schedules(db, None, datetime(2026, 1, 1, 2, 0, tzinfo=UTC))) == 1


def test_validation_and_removal(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    path = _file(tmp_path)
    with pytest.raises(ScheduleError, match="five fields"):
        add_schedule(db, "0 2 * *", path, "translate", model="fake")
    with pytest.raises(ScheduleError, match="not a valid cron"):
        add_schedule(db, "61 2 * * *", path, "translate", model="fake")
    with pytest.raises(ScheduleError, match="no such file"):
        add_schedule(db, "0 2 * * *", tmp_path / "nope.jsonl", "translate", model="fake")
    with pytest.raises(ScheduleError, match="unknown task"):
        add_schedule(db, "0 2 * * *", path, "poetry", model="fake")
    with pytest.raises(ScheduleError, match="time zone"):
        add_schedule(db, "0 2 * * *", path, "translate", model="fake", tz="Mars/Olympus")
    with pytest.raises(ScheduleError, match="unknown schedule option"):
        add_schedule(db, "0 2 * * *", path, "translate", {"colour": "red"}, model="fake")
    sid = add_schedule(db, "0 2 * * *", path, "translate", model="fake")
    remove_schedule(db, sid)
    assert list_schedules(db) == []
    with pytest.raises(ScheduleError, match="no schedule"):
        remove_schedule(db, sid)


def test_cron_times_are_wall_clock_times_of_the_zone_across_dst() -> None:
    berlin = "Europe/Berlin"
    # 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer.
    assert next_run("0 2 * * *", berlin, T0) == datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    summer = datetime(2026, 6, 30, 23, 0, tzinfo=UTC)
    assert next_run("0 2 * * *", berlin, summer) == datetime(2026, 7, 1, 0, 0, tzinfo=UTC)
