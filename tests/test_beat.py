"""`lmjobs beat` is the control process: the tick (reconciler, cron schedules, dispatch) runs
there, and a GPU worker generates and nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fake_engine import FAKE_ENGINE
from services import LMJOBS, WorkerProcess, cli_env, cli_json, wait_for_job
from sqlalchemy import update

from lmjobs.db.models import Schedule, utcnow
from lmjobs.db.session import get_database
from lmjobs.jobs.queues import CONTROL_QUEUE, queue_for_model

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _start_beat(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*LMJOBS, "beat"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_a_cron_schedule_is_ingested_by_beat_with_no_gpu_worker_running(
    db_url: str, redis_url: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    env = cli_env(
        LMJOBS_HOME=str(lmjobs_home),
        LMJOBS_DATABASE_URL=db_url,
        LMJOBS_BROKER_URL=redis_url,
        LMJOBS_MODEL="fake-model",
        LMJOBS_TEST_ENGINE=FAKE_ENGINE,
    )
    src = tmp_path / "nightly.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"alpha beta {i}"}) + "\n" for i in range(12)))
    sid = cli_json(["schedule", "add", str(src), "--cron", "0 2 * * *", "--task", "generate"], env)["id"]
    db = get_database(db_url)
    with db.session() as s:  # due now, instead of waiting for 02:00
        s.execute(
            update(Schedule).where(Schedule.id == sid).values(next_run_at=utcnow() - timedelta(minutes=1))
        )

    # No worker exists while beat reads and ingests the schedule's file.
    beat = _start_beat(env, tmp_path / "beat.log")
    try:
        deadline = time.monotonic() + 120
        jobs: list[dict[str, object]] = []
        while time.monotonic() < deadline and not jobs:
            jobs = cli_json(["list"], env)
            time.sleep(0.5)
        assert jobs, (tmp_path / "beat.log").read_text()
        (job,) = jobs
        assert job["requests_total"] == 12 and job["status"] == "queued"
        (sch,) = cli_json(["schedule", "list"], env)
        assert sch["last_job_id"] == job["id"]

        # A GPU worker consumes its model's queue only, and has no tick task to run.
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            st = wait_for_job(env, int(str(job["id"])), timeout=300)
            assert (st["status"], st["succeeded"]) == ("completed", 12)
        finally:
            worker.stop()
        banner = worker.log().split("[tasks]")[0]
        assert f".> {queue_for_model('fake-model')}" in banner
        assert CONTROL_QUEUE not in banner
        tasks = worker.log().split("[tasks]")[1].split("[")[0]
        assert "lmjobs.run_chunk" in tasks and "lmjobs.tick" not in tasks
    finally:
        _stop(beat)
