"""Faults at the worker level: SIGTERM (warm shutdown) and SIGKILL after it, an engine that
hangs (the per-chunk time limit), a model that fails to load (and remote code that must
not run), a pickled message on the queue."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
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
    tally,
    wait_until,
    worker_env,
    write_prompts,
)
from services import LMJOBS, run_cli
from sqlalchemy import select

from lmjobs.db.models import Chunk
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.queues import queue_for_model

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _chunks(db: Database, job_id: int) -> list[Chunk]:
    with db.session() as s:
        rows = list(s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.seq)))
        s.expunge_all()
        return rows


def _submit(env: dict[str, str], src: Path) -> int:
    out = run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True, timeout=300)
    return int(json.loads(out.stdout)["job_id"])


def test_sigterm_finishes_the_chunk_and_a_later_sigkill_is_recovered(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    env = worker_env(
        lmjobs_home, db_url, private_redis.url, LMJOBS_CHUNK_SIZE="6", LMJOBS_FAKE_DELAY_MS="500"
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, 18)  # three chunks of 3 s
    db = get_database(db_url)
    queue = queue_for_model("fake-model")
    a = Fleet(env, tmp_path, size=1)
    b = Fleet(env, tmp_path, size=1)
    c = Fleet(env, tmp_path, size=1)
    try:
        a.start()
        job_id = _submit(env, src)
        wait_until(lambda: any(ch.status == "running" for ch in _chunks(db, job_id)), 60, "a chunk")
        time.sleep(0.5)
        os.killpg(a.procs[0].pid, signal.SIGTERM)
        t_term = time.monotonic()
        rc = a.procs[0].wait(timeout=30)
        term_s = time.monotonic() - t_term
        after_a = _chunks(db, job_id)
        assert rc == 0, a.log_text()[-2000:]
        assert "Warm shutdown" in a.log_text()
        assert [ch.status for ch in after_a].count("done") == 1  # it finished the chunk it had
        assert [ch.attempts for ch in after_a].count(0) == 2  # and took nothing new
        assert private_redis.queued(queue) == 2  # the other messages are still in Redis

        # SIGTERM, then SIGKILL before the chunk is done: its lease expires, it runs again
        b.start()
        wait_until(
            lambda: sum(ch.status == "running" for ch in _chunks(db, job_id)) == 1,
            60,
            "the next chunk",
        )
        os.killpg(b.procs[0].pid, signal.SIGTERM)
        time.sleep(1.0)
        os.killpg(b.procs[0].pid, signal.SIGKILL)
        b.procs[0].wait(timeout=30)
        stuck = [ch for ch in _chunks(db, job_id) if ch.status == "running"]
        assert len(stuck) == 1
        with Ticker(db_url, private_redis.url, interval=1.0):
            c.start()
            wait_until(lambda: job_finished(db, job_id), 90, "the job to finish")
    finally:
        for f in (a, b, c):
            f.stop()
    t = tally(db, job_id)
    final = {ch.id: ch for ch in _chunks(db, job_id)}
    assert t.job_status == "completed" and t.lost == 0 and t.duplicates == 0
    assert final[stuck[0].id].attempts == 2
    figure(
        f"SIGTERM: the worker finished its running chunk and exited 0 after {term_s:.1f} s, "
        f"taking nothing new; SIGTERM+SIGKILL 1 s later: the chunk was re-run after its "
        f"lease; lost {t.lost}, duplicate rows {t.duplicates}"
    )


def test_a_hung_engine_hits_the_chunk_time_limit(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    calls = tmp_path / "calls.txt"
    # two requests of 5.5 s: 11 s together, over the 10 s limit; 5.5 s alone, under it
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_CHUNK_SIZE="2",
        LMJOBS_FAKE_DELAY_MS="5500",
        LMJOBS_CHUNK_TIME_LIMIT_S="10",
        LMJOBS_MAX_ATTEMPTS="1",
        LMJOBS_FAKE_CALLS_FILE=str(calls),
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, 2)
    db = get_database(db_url)
    fleet = Fleet(env, tmp_path, size=1)
    try:
        fleet.start()
        job_id = _submit(env, src)
        wait_until(lambda: _chunks(db, job_id)[0].attempts >= 2, 60, "the time limit")
        released = _chunks(db, job_id)[0]
        wait_until(lambda: job_finished(db, job_id), 60, "the job to finish")
        alive = fleet.procs[0].poll() is None
    finally:
        fleet.stop()
    t = tally(db, job_id)
    log = fleet.log_text()
    assert alive, log[-3000:]
    assert "ChunkTimeLimitExceeded" in log and "time limit" in (released.last_error or "")
    # past the attempt cap each request runs alone, under the limit: the job completes
    assert t.job_status == "completed" and t.lost == 0 and t.duplicates == 0
    reason = (released.last_error or "").split(";")[0]
    figure(
        f"hang: an 11 s chunk against a 10 s limit was stopped and released "
        f"({reason}), then ran request by request and completed; "
        f"generations {sum(generated_counts(calls).values())} for 2 requests"
    )


def test_a_model_that_fails_to_load_consumes_nothing(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    marker = tmp_path / "remote-code-ran"
    evil = tmp_path / "evil-model"
    evil.mkdir()
    (evil / "config.json").write_text(
        json.dumps(
            {
                "model_type": "lmjobs_evil",
                "architectures": ["EvilModel"],
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForCausalLM": "evil.EvilModel",
                },
            }
        )
    )
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    hf = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    lines = []
    for model in ("/nonexistent/model", str(evil)):
        env = worker_env(lmjobs_home, db_url, private_redis.url, LMJOBS_MODEL=model, **hf)
        env.pop("LMJOBS_TEST_ENGINE")
        src = tmp_path / "in.jsonl"
        write_prompts(src, 10)
        run_cli(["submit", str(src), "--task", "generate", "--yes"], env, check=True, timeout=300)
        queue = queue_for_model(model)
        before = private_redis.queued(queue)
        assert before == 1
        proc = run_cli(["worker"], env, timeout=300)
        assert proc.returncode != 0
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert " ready." not in proc.stdout + proc.stderr
        assert private_redis.queued(queue) == before  # nothing consumed
        lines.append(errors[0])
    assert "does not exist" in lines[0]
    assert not marker.exists(), "remote code ran although trust_remote_code is off"
    assert "custom code" in lines[1] or "trust_remote_code" in lines[1], lines[1]

    # the setting is passed through: switched on, the same folder's code does run
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_MODEL=str(evil),
        LMJOBS_TRUST_REMOTE_CODE="1",
        **hf,
    )
    env.pop("LMJOBS_TEST_ENGINE")
    proc = run_cli(["worker"], env, timeout=300)
    assert proc.returncode != 0 and marker.exists()
    figure(
        f"model load failure: `lmjobs worker` exited non-zero with one line ({lines[0]!r}; "
        "for a folder with custom code: 'contains custom code ... trust_remote_code'), "
        "consumed nothing (the queued messages stayed in Redis); the folder's code ran "
        "only with LMJOBS_TRUST_REMOTE_CODE=1"
    )


class _Payload:
    """Unpickling this calls open(path, 'w'): proof that the payload was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_pickled_message_is_refused(private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path) -> None:
    from kombu import Connection, Exchange, Queue

    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    env = worker_env(lmjobs_home, db_url, private_redis.url, LMJOBS_CHUNK_SIZE="5")
    marker = tmp_path / "pickle-ran"
    queue = queue_for_model("fake-model")
    fleet = Fleet(env, tmp_path, size=1)
    try:
        fleet.start()
        # Celery's protocol 2 body, (args, kwargs, embed), with the payload as an argument
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body: tuple[object, ...] = ((_Payload(str(marker)), 1), {}, embed)
        assert b"open" in pickle.dumps(body)
        # the transport options of worker/app.py, so kombu reads Celery's binding table
        options = {
            "sep": ":",
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
        }
        with Connection(private_redis.url, transport_options=options) as conn:
            exchange = Exchange(queue, type="direct")
            conn.Producer().publish(
                body,
                serializer="pickle",
                exchange=exchange,
                routing_key=queue,
                declare=[Queue(queue, exchange, routing_key=queue)],
                headers={
                    "lang": "py",
                    "task": "lmjobs.run_chunk",
                    "id": "chunk-1-0123456789ab",
                    "argsrepr": "",
                    "kwargsrepr": "",
                },
            )
        wait_until(lambda: private_redis.queued(queue) == 0, 30, "the worker to take it")
        time.sleep(1.0)
        # the worker refused it and still works
        src = tmp_path / "in.jsonl"
        write_prompts(src, 10)
        job_id = _submit(env, src)
        db = get_database(db_url)
        wait_until(lambda: job_finished(db, job_id), 60, "a normal job after the pickle")
        alive = fleet.procs[0].poll() is None
    finally:
        fleet.stop()
    log = fleet.log_text()
    assert not marker.exists(), "a pickled message was executed"
    assert alive
    assert "pickle" in log.lower() and ("untrusted" in log.lower() or "disallowed" in log.lower())
    assert tally(db, job_id).job_status == "completed"
    figure(
        "pickle: a pickled run_chunk message whose payload would create a file was refused "
        "by a real worker (file not created, worker kept working)"
    )


def test_passwords_never_reach_logs_or_output(
    private_redis: RedisServer, tmp_path: Path, lmjobs_home: Path
) -> None:
    from faultkit import PG_SECRET, REDIS_SECRET, free_port

    pg_down = f"postgresql://postgres:{PG_SECRET}@127.0.0.1:{free_port()}/nope"
    redis_down = f"redis://:{REDIS_SECRET}@127.0.0.1:{free_port()}/0"
    db_url = f"sqlite:///{tmp_path / 'lm.db'}"
    texts: list[str] = []

    env = worker_env(lmjobs_home, pg_down, private_redis.url)
    for args in (["config"], ["config", "--json"]):
        p = run_cli(args, env, check=True)
        assert "***" in p.stdout
        texts += [p.stdout, p.stderr]
    for args in (["list"], ["status", "1"], ["worker"]):
        p = run_cli(args, env, timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        texts += [p.stdout, p.stderr]

    # a worker whose broker is unreachable keeps retrying and logging: masked there too
    env = worker_env(lmjobs_home, db_url, redis_down)
    log = tmp_path / "w-redis-down.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*LMJOBS, "worker"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: "Cannot connect" in log.read_text(errors="replace"),
            60,
            "the worker to report the broker down",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    texts.append(log.read_text(errors="replace"))
    assert ":**@" in texts[-1] or ":***@" in texts[-1]
    assert_no_secret(*texts)
    figure(
        f"passwords: {len(texts)} outputs and logs (config, list, status, worker with the "
        "database down, worker with Redis down) contain no password"
    )
