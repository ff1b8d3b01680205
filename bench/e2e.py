"""The end-to-end arm: the workload as a real job through the queue.

A real ``lmjobs worker`` process (Celery, solo pool) holds the same model; ``lmjobs
submit`` queues the requests through Redis; the results table is the measurement:
output tokens summed over the job's results, over the wall time from its first chunk
claim (``chunks.started_at``) to its last result row (``results.created_at``). A small
warm-up job runs first, so the worker's first forward passes are not in the timed job.

The worker gets a fresh ``LMJOBS_HOME`` (SQLite there unless a database URL is given),
its own Redis database index by default (so no other worker on the machine can take the
benchmark's chunks), and the same device, dtype and thread count as the in-process arms.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lmjobs.bench.arms import ArmOutput
from lmjobs.bench.harness import HarnessError, WorkerProcess, check_redis, cli_env, cli_json, wait_for_job
from lmjobs.bench.workloads import BenchRequest

DEFAULT_BROKER = "redis://127.0.0.1:6379/12"
POLL_S = 0.25  # how often the job's status is read: the submit-to-done time is this coarse
LOG_TAIL = 2000  # characters of the worker's log an error quotes (the report keeps 1000)


class E2EError(RuntimeError):
    """The end-to-end arm could not run (no Redis, the worker did not start, ...)."""


@dataclass
class E2EOptions:
    model: str  # what LMJOBS_MODEL names: an alias, a folder
    device: str
    dtype: str
    chunk_size: int
    model_cache: Path
    database_url: str = ""  # empty: SQLite in a temporary LMJOBS_HOME
    broker_url: str = DEFAULT_BROKER
    threads: int | None = None
    batch_tokens: int = 0
    max_batch_size: int = 64
    timeout_s: float = 1800.0


@dataclass
class E2EResult:
    output_tokens: int
    requests: int
    succeeded: int
    elapsed_s: float  # first claim to last result
    submit_to_done_s: float  # the submit command's start to the job's last result
    warmup_s: float
    chunks: int
    timeline: list[dict[str, Any]]  # per chunk: claimed_s, closed_s after the first claim
    chunk_size: int
    database: str
    outputs: ArmOutput


def _env(opts: E2EOptions, home: Path) -> dict[str, str]:
    """Only what ``opts`` says configures lmjobs: the caller's ``LMJOBS_*`` are dropped."""
    overrides = dict(
        LMJOBS_HOME=str(home),
        LMJOBS_MODEL=opts.model,
        LMJOBS_MODEL_CACHE=str(opts.model_cache),
        LMJOBS_DEVICE=opts.device,
        LMJOBS_DTYPE=opts.dtype,
        LMJOBS_BROKER_URL=opts.broker_url,
        LMJOBS_CHUNK_SIZE=str(opts.chunk_size),
        LMJOBS_BATCH_TOKENS=str(opts.batch_tokens),
        LMJOBS_MAX_BATCH_SIZE=str(opts.max_batch_size),
        LMJOBS_WORKER_NAME="bench",
        PYTHONUNBUFFERED="1",
    )
    if opts.database_url:
        overrides["LMJOBS_DATABASE_URL"] = opts.database_url
    if opts.threads:
        overrides["OMP_NUM_THREADS"] = overrides["MKL_NUM_THREADS"] = str(opts.threads)
    return cli_env(keep_lmjobs=False, **overrides)


def _write_jobfile(path: Path, requests: Sequence[BenchRequest]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps(r.job_line, ensure_ascii=False) + "\n")


def _submit(path: Path, task: str, raw_prompt: bool, env: dict[str, str]) -> int:
    args = ["submit", str(path), "--task", task, "--yes"]
    if raw_prompt:
        args.append("--raw-prompt")
    return int(cli_json(args, env)["job_id"])


def _wait(db: Any, env: dict[str, str], job_id: int, timeout: float, worker: WorkerProcess) -> None:
    """Until the job finishes, reading its status from the database (see ``POLL_S``)."""
    from lmjobs.jobs.control import job_status

    def read() -> dict[str, Any]:
        return {"status": job_status(db, job_id).status}

    wait_for_job(env, job_id, timeout=timeout, poll_s=POLL_S, read=read, worker=worker)


def _timeline(db: Any, job_id: int, first: datetime) -> list[dict[str, Any]]:
    """Each chunk's claim and close, in seconds after the job's first claim."""
    from sqlalchemy import select

    from lmjobs.db.models import Chunk

    with db.session() as s:
        rows = s.execute(
            select(Chunk.seq, Chunk.requests_total, Chunk.started_at, Chunk.finished_at)
            .where(Chunk.job_id == job_id)
            .order_by(Chunk.started_at)
        ).all()
    return [
        {
            "seq": seq,
            "requests": n,
            "claimed_s": round((start - first).total_seconds(), 3) if start else None,
            "closed_s": round((end - first).total_seconds(), 3) if end else None,
        }
        for seq, n, start, end in rows
    ]


def _measure(db: Any, job_id: int) -> tuple[datetime, datetime, ArmOutput, int]:
    from sqlalchemy import func, select

    from lmjobs.db.models import Chunk, Request, Result

    with db.session() as s:
        first = s.scalar(select(func.min(Chunk.started_at)).where(Chunk.job_id == job_id))
        last = s.scalar(select(func.max(Result.created_at)).where(Result.job_id == job_id))
        rows = s.execute(
            select(
                Request.custom_id,
                Result.output_text,
                Result.output_tokens,
                Result.finish_reason,
                Result.status,
                Result.error,
            )
            .join(Request, Request.id == Result.request_id)
            .where(Result.job_id == job_id)
        ).all()
    out = ArmOutput()
    ok = 0
    for custom_id, text, tokens, finish, status, error in rows:
        key = int(custom_id)
        out.texts[key] = text or ""
        out.tokens[key] = int(tokens or 0)
        out.finish[key] = str(finish)
        if status == "succeeded":
            ok += 1
        elif error:
            out.errors[key] = str(error)
    if first is None or last is None:
        raise E2EError(f"job {job_id} has no claimed chunk or no result")
    return first, last, out, ok


def run_e2e(
    requests: Sequence[BenchRequest],
    warmup: Sequence[BenchRequest],
    *,
    task: str,
    raw_prompt: bool,
    opts: E2EOptions,
) -> E2EResult:
    """Start a worker, run a warm-up job and the timed job, read the results table."""
    from lmjobs.db.migrate import upgrade
    from lmjobs.db.session import forget_databases, get_database

    try:
        check_redis(opts.broker_url)
    except HarnessError as exc:
        raise E2EError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="lmjobs-bench-") as tmp:
        home = Path(tmp)
        env = _env(opts, home)
        url = opts.database_url or f"sqlite:///{home / 'lmjobs.db'}"
        upgrade(url)
        db = get_database(url)
        worker = WorkerProcess(env, home / "worker.log", "bench", tail_chars=LOG_TAIL)
        try:
            worker.start(timeout=300)
            _write_jobfile(home / "warmup.jsonl", warmup)
            start = time.perf_counter()
            warm_id = _submit(home / "warmup.jsonl", task, raw_prompt, env)
            _wait(db, env, warm_id, opts.timeout_s, worker)
            warmup_s = time.perf_counter() - start

            _write_jobfile(home / "bench.jsonl", requests)
            start = time.perf_counter()
            job_id = _submit(home / "bench.jsonl", task, raw_prompt, env)
            _wait(db, env, job_id, opts.timeout_s, worker)
            submit_to_done = time.perf_counter() - start
            first, last, outputs, ok = _measure(db, job_id)
            timeline = _timeline(db, job_id, first)
        except HarnessError as exc:  # the report names the arm's own error
            raise E2EError(str(exc)) from None
        finally:
            worker.stop()
            forget_databases()
    return E2EResult(
        output_tokens=outputs.output_tokens,
        requests=len(requests),
        succeeded=ok,
        elapsed_s=max(1e-9, (last - first).total_seconds()),
        submit_to_done_s=submit_to_done,
        warmup_s=warmup_s,
        chunks=len(timeline),
        timeline=timeline,
        chunk_size=opts.chunk_size,
        database=url.split(":", 1)[0],
        outputs=outputs,
    )
