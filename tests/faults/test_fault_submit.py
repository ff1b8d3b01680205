"""Faults around `lmjobs submit`: the broker down at submit time, a submit killed half-way,
the same file submitted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faultkit import (
    REDIS_SECRET,
    Fleet,
    RedisServer,
    assert_no_secret,
    figure,
    free_port,
    tally,
    wait_until,
    worker_env,
    write_prompts,
)
from services import LMJOBS, cli_json, run_cli, wait_for_job
from sqlalchemy import func, select

from lmjobs.db.models import Chunk, Job, Request, Result
from lmjobs.db.session import get_database

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_submit_with_redis_down_is_saved_and_reconcile_dispatches_it_later(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    down = f"redis://:{REDIS_SECRET}@127.0.0.1:{free_port()}/0"  # nothing listens there
    src = tmp_path / "in.jsonl"
    write_prompts(src, 60)
    env_down = worker_env(lmjobs_home, db_url, down, LMJOBS_CHUNK_SIZE="20")
    t0 = time.monotonic()
    sub = run_cli(["submit", str(src), "--task", "generate", "--json"], env_down, timeout=300)
    submit_s = time.monotonic() - t0
    assert sub.returncode == 0, sub.stderr
    out = json.loads(sub.stdout)
    assert out["dispatched"] == 0 and out["requests"] == 60
    assert "could not be dispatched" in sub.stderr and "lmjobs reconcile" in sub.stderr
    recon_down = run_cli(["reconcile"], env_down, timeout=300)
    assert recon_down.returncode != 0 and "error:" in recon_down.stderr
    assert "Traceback" not in recon_down.stderr
    st = cli_json(["status", str(out["job_id"])], env_down)
    assert st["status"] == "queued" and st["pending"] == 60

    env_up = worker_env(lmjobs_home, db_url, private_redis.url, LMJOBS_CHUNK_SIZE="20")
    rec = cli_json(["reconcile"], env_up)
    assert rec["dispatched"] == 3
    fleet = Fleet(env_up, tmp_path, size=1)
    try:
        fleet.start()
        st = wait_for_job(env_up, out["job_id"], timeout=120)
    finally:
        fleet.stop()
    assert st["status"] == "completed" and st["succeeded"] == 60
    figure(
        f"submit with Redis down: exit 0 after {submit_s:.1f} s with a warning, job queued; "
        f"`lmjobs reconcile` with Redis back dispatched {rec['dispatched']} chunks; "
        "job completed"
    )
    assert_no_secret(sub.stdout, sub.stderr, recon_down.stdout, recon_down.stderr, fleet.log_text())


def test_submit_killed_half_way_never_runs_and_is_cleaned_up(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    # Submit writes ~4,096 requests per transaction (jobs/ingest.py FLUSH_ROWS): a file of
    # several such batches is still being written when the first chunks are visible.
    env = worker_env(lmjobs_home, db_url, private_redis.url, LMJOBS_CHUNK_SIZE="500")
    src = tmp_path / "big.jsonl"
    n = 30_000
    write_prompts(src, n)
    db = get_database(db_url)
    fleet = Fleet(env, tmp_path, size=1)
    try:
        fleet.start()  # a worker is there all along: it must take nothing from the half job

        def kill_submit_midway() -> tuple[int, int]:
            proc = subprocess.Popen(
                [*LMJOBS, "submit", str(src), "--task", "generate", "--yes"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:

                def chunks_written() -> int:
                    with db.session() as s:
                        return (
                            s.scalar(
                                select(func.count())
                                .select_from(Chunk)
                                .join(Job, Job.id == Chunk.job_id)
                                .where(Job.status == "submitting")
                            )
                            or 0
                        )

                wait_until(lambda: chunks_written() >= 4, 60, "the submit to write chunks", every=0.05)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            with db.session() as s:
                job_id = s.scalars(select(Job.id).where(Job.status == "submitting")).one()
                written = (
                    s.scalar(select(func.count()).select_from(Request).where(Request.job_id == job_id)) or 0
                )
            return job_id, written

        job_id, written = kill_submit_midway()
        assert 0 < written < n
        listed = {j["id"]: j for j in cli_json(["list"], env)}
        assert listed[job_id]["status"] == "submitting"
        st = cli_json(["status", str(job_id)], env)
        assert st["status"] == "submitting"
        rec = cli_json(["reconcile"], env)
        assert rec["dispatched"] == 0 and job_id not in rec["finished"]
        time.sleep(2)
        with db.session() as s:
            statuses = set(s.scalars(select(Chunk.status).where(Chunk.job_id == job_id)))
            results = s.scalar(select(func.count()).select_from(Result)) or 0
        assert statuses == {"pending"} and results == 0  # never dispatched, never claimed

        gone = cli_json(["cleanup", "--idle", "1"], env)
        assert gone == {"discarded": [job_id], "still_submitting": []}
        assert cli_json(["list"], env) == []

        # killed again, then the same file submitted again: the leftover goes by itself
        job2, _ = kill_submit_midway()
        again = run_cli(["submit", str(src), "--task", "generate", "--json"], env, timeout=300)
        assert again.returncode == 0, again.stderr
        assert f"discarded job {job2}" in again.stderr
        job3 = json.loads(again.stdout)["job_id"]
        assert [j["id"] for j in cli_json(["list"], env)] == [job3]
        st3 = wait_for_job(env, job3, timeout=240)
    finally:
        fleet.stop()
    t = tally(db, job3)
    assert st3["status"] == "completed" and t.lost == 0 and t.duplicates == 0
    figure(
        f"interrupted submit: SIGKILL after {written}/{n} requests written: job stayed "
        f"'submitting', 0 chunks dispatched or claimed, `lmjobs cleanup` removed it; a "
        f"resubmit of the same file discarded its leftover and completed {t.requests} requests"
    )


def test_same_file_twice_is_detected(private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    env = worker_env(lmjobs_home, db_url, private_redis.url)
    src = tmp_path / "in.jsonl"
    write_prompts(src, 5)
    first = json.loads(
        run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True, timeout=300).stdout
    )["job_id"]
    second = run_cli(["submit", str(src), "--task", "generate"], env, timeout=300)  # stdin: no tty
    assert second.returncode == 1
    assert f"already submitted as job {first}" in second.stderr and "--yes" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(cli_json(["list"], env)) == 1
    # another task on the same file is a different job, not a repeat
    other = run_cli(["submit", str(src), "--task", "summarize", "--json"], env, timeout=300)
    assert other.returncode != 0 or "already submitted" not in other.stderr
    yes = run_cli(["submit", str(src), "--task", "generate", "--yes", "--json"], env, timeout=300)
    assert yes.returncode == 0, yes.stderr
    assert len([j for j in cli_json(["list"], env) if j["task"] == "generate"]) == 2
