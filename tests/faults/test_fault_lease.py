"""A chunk that runs longer than its lease, delivered a second (and third) time while it
runs, with the reconciler ticking: the heartbeat keeps the lease, the idle worker that
gets the extra deliveries cannot claim it, and no request is generated twice.

Also: a dead worker's chunk is picked up within lease_seconds + one tick, through the
real `lmjobs beat` (its tick goes to the control queue, which workers also consume).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faultkit import (
    Fleet,
    RedisServer,
    Ticker,
    assert_no_secret,
    figure,
    generated_counts,
    job_finished,
    pg_url_with_password,
    tally,
    wait_until,
    worker_env,
    write_prompts,
)
from services import LMJOBS, run_cli
from sqlalchemy import select

from lmjobs.db.models import Chunk
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.dispatch import ChunkMessage
from lmjobs.jobs.queues import broker_priority, queue_for_model
from lmjobs.jobs.reconcile import TICK_SECONDS
from lmjobs.jobs.settings import Settings
from lmjobs.worker.app import make_celery
from lmjobs.worker.broker import CeleryPublisher

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

LEASE_S = 5


def _chunk(db: Database, job_id: int) -> Chunk:
    with db.session() as s:
        chunk = s.scalars(select(Chunk).where(Chunk.job_id == job_id)).one()
        s.expunge(chunk)
        return chunk


def test_slow_chunk_delivered_again_is_never_run_twice(
    private_redis: RedisServer, pg_name: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = pg_url_with_password(pg_name)
    calls = tmp_path / "calls.txt"
    n, delay_ms = 10, 1000  # one chunk of 10 s against a 5 s lease
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_CHUNK_SIZE=str(n),
        LMJOBS_FAKE_DELAY_MS=str(delay_ms),
        LMJOBS_FAKE_CALLS_FILE=str(calls),
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, n)
    publish = CeleryPublisher(make_celery(Settings(broker_url=private_redis.url)))
    fleet = Fleet(env, tmp_path, size=2)  # one runs the chunk, the other gets the repeats
    try:
        fleet.start()
        job_id = int(
            json.loads(run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True).stdout)[
                "job_id"
            ]
        )
        db = get_database(db_url)
        with Ticker(db_url, private_redis.url, interval=1.0) as ticker:
            wait_until(lambda: _chunk(db, job_id).status == "running", 60, "the chunk to start")
            first = _chunk(db, job_id)
            repeats = 0
            for at in (LEASE_S + 1.5, LEASE_S + 3.5):  # both after the first lease would expire
                assert first.started_at is not None
                time.sleep(max(0.0, first.started_at.timestamp() + at - time.time()))
                queue = queue_for_model("fake-model")
                publish(ChunkMessage(job_id, first.id, queue, broker_priority(0)))
                repeats += 1
            wait_until(lambda: job_finished(db, job_id), 60, "the job to finish")
            time.sleep(2)  # let the repeats be consumed
        assert private_redis.queued(queue_for_model("fake-model")) == 0
    finally:
        fleet.stop()
    t = tally(db, job_id)
    gen = generated_counts(calls)
    chunk = _chunk(db, job_id)
    assert chunk.started_at is not None and chunk.finished_at is not None
    run_s = (chunk.finished_at - chunk.started_at).total_seconds()
    figure(
        f"lease: one chunk ran {run_s:.1f} s against a {LEASE_S} s lease (heartbeat 1 s), "
        f"delivered {repeats} more times while running, {ticker.ticks} reconciler ticks: "
        f"claims {chunk.attempts}, requests generated twice {sum(v > 1 for v in gen.values())}, "
        f"duplicate rows {t.duplicates}, lost {t.lost}"
    )
    assert run_s > LEASE_S
    assert chunk.attempts == 1  # neither the repeats nor the reconciler took it
    assert len(gen) == n and max(gen.values()) == 1
    assert t.lost == 0 and t.duplicates == 0 and t.job_status == "completed"
    assert ticker.expired == 0
    assert_no_secret(fleet.log_text())


def test_dead_workers_chunk_is_picked_up_by_beat_within_lease_plus_tick(
    private_redis: RedisServer, pg_name: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    """The bound documented in docs/reliability.md, measured with the real `lmjobs beat`."""
    import subprocess

    db_url = pg_url_with_password(pg_name)
    n = 8
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_CHUNK_SIZE=str(n),
        LMJOBS_FAKE_DELAY_MS="1500",
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, n)
    fleet = Fleet(env, tmp_path, size=1)
    beat_log = tmp_path / "beat.log"
    with open(beat_log, "wb") as fh:
        beat = subprocess.Popen(
            [*LMJOBS, "beat"], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        fleet.start()
        job_id = int(
            json.loads(run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True).stdout)[
                "job_id"
            ]
        )
        db = get_database(db_url)
        wait_until(lambda: _chunk(db, job_id).status == "running", 60, "the chunk to start")
        time.sleep(2.0)
        fleet.kill_random(__import__("random").Random(1))
        t_kill = time.time()
        fleet.top_up()  # a fresh worker: it must wait for the lease to expire and a tick
        wait_until(
            lambda: _chunk(db, job_id).attempts == 2,
            LEASE_S + TICK_SECONDS + 30,
            "the chunk to be claimed again",
        )
        again = _chunk(db, job_id)
        assert again.started_at is not None
        picked_up_s = again.started_at.timestamp() - t_kill
        wait_until(lambda: job_finished(db, job_id), 60, "the job to finish")
    finally:
        fleet.stop()
        beat.terminate()
        try:
            beat.wait(timeout=20)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait()
    t = tally(db, job_id)
    bound = LEASE_S + TICK_SECONDS
    figure(
        f"dead worker: its chunk was claimed again {picked_up_s:.1f} s after the SIGKILL "
        f"(bound: lease {LEASE_S} s + beat tick {TICK_SECONDS:.0f} s = {bound:.0f} s, plus a "
        f"worker start); lost {t.lost}, duplicate rows {t.duplicates}"
    )
    assert picked_up_s <= bound + 10  # + the time the new worker needs to fetch the message
    assert t.lost == 0 and t.duplicates == 0 and t.job_status == "completed"
    assert_no_secret(fleet.log_text(), beat_log.read_text(errors="replace"))
