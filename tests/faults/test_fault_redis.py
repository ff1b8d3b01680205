"""Redis restarted (no persistence: every queued message is gone) and Redis flushed, each
in the middle of a job, on a private redis-server: the workers reconnect, the reconciler
rebuilds the queue from the database, nothing is lost and nothing is written twice."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
    results_count,
    tally,
    wait_until,
    worker_env,
    write_prompts,
)
from services import run_cli
from sqlalchemy import select

from lmjobs.db.session import get_database

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

N_REQUESTS = 800
CHUNK = 20


def test_redis_restarted_then_flushed_mid_job(
    private_redis: RedisServer, pg_name: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = pg_url_with_password(pg_name)
    calls = tmp_path / "calls.txt"
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_CHUNK_SIZE=str(CHUNK),
        LMJOBS_FAKE_DELAY_MS="15",
        LMJOBS_FAKE_CALLS_FILE=str(calls),
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, N_REQUESTS)
    fleet = Fleet(env, tmp_path, size=2)
    faults: list[tuple[str, Callable[[], None], float]] = [
        ("restart", private_redis.restart, 0.2),
        ("flush", private_redis.flush, 0.55),
    ]
    seen: list[str] = []
    t0 = time.monotonic()
    try:
        fleet.start()
        sub = run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True)
        job_id = int(json.loads(sub.stdout)["job_id"])
        db = get_database(db_url)
        with Ticker(db_url, private_redis.url, interval=1.0) as ticker:
            for name, inject, at in faults:
                wait_until(
                    lambda: results_count(db, job_id) >= N_REQUESTS * at,  # noqa: B023
                    120,
                    f"{at:.0%} of the job",
                )
                before = results_count(db, job_id)
                inject()
                t_fault = time.monotonic()
                wait_until(
                    lambda before=before: results_count(db, job_id) > before + 3 * CHUNK,
                    120,
                    f"progress after the {name}",
                )
                seen.append(
                    f"{name} at {before}/{N_REQUESTS} results, progress again after "
                    f"{time.monotonic() - t_fault:.0f} s"
                )
            wait_until(lambda: job_finished(db, job_id), 180, f"job {job_id} to finish")
        assert not [p for p in fleet.procs if p.poll() is not None], "a worker exited"
    finally:
        fleet.stop()
    t = tally(db, job_id)
    twice = sum(1 for n in generated_counts(calls).values() if n > 1)
    figure(
        f"redis: {'; '.join(seen)}; the 2 workers reconnected and kept consuming; "
        f"lost {t.lost}, duplicate rows {t.duplicates}, job {t.job_status}, "
        f"lost messages requeued {ticker.lost}, generated twice {twice}, "
        f"{time.monotonic() - t0:.0f} s in all"
    )
    assert private_redis.restarts == 1 and private_redis.flushes == 1
    assert t.lost == 0 and t.duplicates == 0
    assert t.job_status == "completed"
    assert_no_secret(fleet.log_text(), sub.stdout, sub.stderr)


_DIE_AFTER_FETCH = """
import os, sys
from kombu import Connection
options = {"sep": ":", "priority_steps": list(range(10)), "queue_order_strategy": "priority"}
conn = Connection(sys.argv[1], transport_options=options)
msg = conn.default_channel.basic_get(sys.argv[2], no_ack=False)
assert msg is not None
os._exit(0)  # like a worker killed after the fetch and before the claim
"""


def test_a_message_fetched_by_a_worker_that_died_before_claiming_is_redispatched(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    """Its message sits in Redis' unacked set until the visibility timeout (hours); the
    chunk is still ``dispatched``. The reconciler must not count it as present forever."""
    import subprocess
    import sys
    from datetime import timedelta

    from lmjobs.db.models import Chunk, utcnow
    from lmjobs.jobs.queues import queue_for_model
    from lmjobs.jobs.reconcile import tick
    from lmjobs.worker.broker import redis_chunk_ids

    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    env = worker_env(lmjobs_home, db_url, private_redis.url, LMJOBS_CHUNK_SIZE="5")
    src = tmp_path / "in.jsonl"
    write_prompts(src, 5)
    job_id = int(
        json.loads(run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True).stdout)[
            "job_id"
        ]
    )
    queue = queue_for_model("fake-model")
    subprocess.run([sys.executable, "-c", _DIE_AFTER_FETCH, private_redis.url, queue], check=True, timeout=60)
    r = private_redis.client()
    assert r.hlen("unacked") == 1 and private_redis.queued(queue) == 0
    db = get_database(db_url)
    with db.session() as s:
        chunk_id = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id)).one()
    assert redis_chunk_ids(private_redis.url) == {chunk_id}  # just fetched: present
    later = time.time() + 60
    assert redis_chunk_ids(private_redis.url, now=later) == set()  # fetched long ago: lost

    from lmjobs.jobs.settings import Settings
    from lmjobs.worker.app import make_celery
    from lmjobs.worker.broker import CeleryPublisher

    publish = CeleryPublisher(make_celery(Settings(broker_url=private_redis.url)))
    rep = tick(
        db,
        publish,
        broker_view=lambda: redis_chunk_ids(private_redis.url, now=later),
        now=utcnow() + timedelta(seconds=60),
    )
    assert rep.lost_messages == 1 and rep.dispatched == 1
    assert private_redis.queued(queue) == 1  # a fresh one; the old one is a no-op if it comes back
    figure(
        "unacked: a message fetched by a worker that died before claiming its chunk is "
        "counted lost after 30 s and the chunk re-dispatched (it used to wait for the "
        "6 h visibility timeout)"
    )
