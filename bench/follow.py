"""Following a big job: ``status``, ``list`` and ``report`` on a job of N requests, on SQLite
and PostgreSQL.

    python -m lmjobs.bench.follow --requests 10000000 [--postgres URL] [--json-out FILE]

The job is built directly in the database by a few SQL statements (``generate_series`` on
PostgreSQL, a recursive CTE on SQLite): its chunks of 64, the first ``--closed`` share of
them ``done`` with their counts and token sums written (one request in 50 failed, with one
of three errors; 40 tokens in and 12 out each), one ``running``, the rest ``pending``; a
result row for every request of a closed chunk and a ``rouge_l`` score for each succeeded
one; each table written in chunk order, so that a chunk's rows lie side by side as ingest
and the workers write them; then ANALYZE. It times the services the CLI calls (best of ``--repeat``), the old
count of ``results`` for comparison, and each command once as a whole ``lmjobs`` process
(start-up included). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from lmjobs.bench.harness import cli_env
from lmjobs.bench.ingest import timed

CHUNK = 64
FAIL_EVERY = 50  # line numbers divisible by this failed
TOKENS_IN, TOKENS_OUT = 40, 12  # of every result
ERRORS = ("ValueError: prompt too long", "invalid request: no target language", "timeout")


def _series(dialect: str, name: str, count: str) -> str:
    """A CTE ``name(k)`` of 0 .. count-1 (``count``: an SQL expression)."""
    if dialect == "postgresql":
        return f"{name}(k) AS (SELECT generate_series(0, {count} - 1))"
    return (
        f"{name}(k) AS (SELECT 0 WHERE {count} > 0 UNION ALL SELECT k + 1 FROM {name} WHERE k + 1 < {count})"
    )


def build_job(db: Any, requests: int, *, closed: float = 0.6) -> int:
    """A running job of ``requests`` requests, written straight into the tables (see the
    module's docstring); returns its id. Also used by the tests at a small size."""
    from sqlalchemy import text

    from lmjobs.db.models import Job, JobStatus, utcnow

    dialect = db.engine.dialect.name
    recursive = "" if dialect == "postgresql" else "RECURSIVE "
    as_json = "::json" if dialect == "postgresql" else ""
    n_chunks = -(-requests // CHUNK)
    n_closed = min(n_chunks, int(n_chunks * closed))
    now = utcnow()
    started = now - timedelta(hours=1)
    with db.session() as s:
        job = Job(
            name="follow-bench",
            task="summarize",
            model="m",
            queue="lmjobs.m",
            params_json={},
            template_version="summarize/v2",
            input_format="native",
            status=JobStatus.RUNNING.value,
            priority=0,
            requests_total=requests,
            lines_rejected=0,
            chunks_total=n_chunks,
            created_at=now,
            started_at=started,
        )
        s.add(job)
        s.flush()
        job_id = int(job.id)
    p = {
        "job": job_id,
        "n": requests,
        "chunks": n_chunks,
        "closed": n_closed,
        "size": CHUNK,
        # SQLite: naive UTC text, as SQLAlchemy writes it
        "started": started if dialect == "postgresql" else started.replace(tzinfo=None),
    }
    statements = [
        # chunks: [0, closed) done with counts, closed running, the rest pending
        f"INSERT INTO chunks (job_id, seq, first_line, last_line, requests_total, requests_succeeded,"
        f" requests_failed, requests_deduplicated, input_tokens, output_tokens, status, priority, attempts,"
        f" started_at, finished_at)"
        f" WITH {recursive}{_series(dialect, 'g', ':chunks')}"
        f" SELECT :job, k, k * :size + 1, MIN(k * :size + :size, :n),"
        f" MIN(k * :size + :size, :n) - k * :size,"
        f" CASE WHEN k < :closed THEN MIN(k * :size + :size, :n) - k * :size"
        f"   - (MIN(k * :size + :size, :n) / {FAIL_EVERY} - (k * :size) / {FAIL_EVERY}) END,"
        f" CASE WHEN k < :closed THEN MIN(k * :size + :size, :n) / {FAIL_EVERY} - (k * :size) / {FAIL_EVERY}"
        f"   END,"
        f" CASE WHEN k < :closed THEN 0 END,"
        f" CASE WHEN k < :closed THEN {TOKENS_IN} * (MIN(k * :size + :size, :n) - k * :size) END,"
        f" CASE WHEN k < :closed THEN {TOKENS_OUT} * (MIN(k * :size + :size, :n) - k * :size) END,"
        f" CASE WHEN k < :closed THEN 'done' WHEN k = :closed THEN 'running' ELSE 'pending' END,"
        f" 0, CASE WHEN k <= :closed THEN 1 ELSE 0 END,"
        f" CASE WHEN k <= :closed THEN :started END,"
        f" CASE WHEN k < :closed THEN CURRENT_TIMESTAMP END"
        f" FROM g",
        f"INSERT INTO requests (job_id, chunk_id, line_number, custom_id, task, input_json,"
        f" content_sha256, isolated_attempts)"
        f" WITH {recursive}{_series(dialect, 'o', ':size')}"
        f" SELECT :job, c.id, c.first_line + o.k, 'r' || (c.first_line + o.k), 'summarize',"
        f" '{{\"text\": \"a line to summarize\"}}'{as_json}, 'h' || (c.first_line + o.k), 0"
        f" FROM chunks c JOIN o ON c.first_line + o.k <= c.last_line WHERE c.job_id = :job"
        f" ORDER BY c.seq, o.k",  # a chunk's requests side by side, as ingest writes them
        f"INSERT INTO results (job_id, request_id, sample_index, status, output_text, error, finish_reason,"
        f" input_tokens, output_tokens, latency_ms, model, worker, attempt, deduplicated, created_at)"
        f" SELECT r.job_id, r.id, 0,"
        f" CASE WHEN r.line_number % {FAIL_EVERY} = 0 THEN 'failed' ELSE 'succeeded' END,"
        f" CASE WHEN r.line_number % {FAIL_EVERY} = 0 THEN NULL ELSE 'summary of ' || r.custom_id END,"
        f" CASE WHEN r.line_number % {FAIL_EVERY} <> 0 THEN NULL"
        f"   WHEN r.line_number % {3 * FAIL_EVERY} = 0 THEN '{ERRORS[0]}'"
        f"   WHEN r.line_number % {3 * FAIL_EVERY} = {FAIL_EVERY} THEN '{ERRORS[1]}'"
        f"   ELSE '{ERRORS[2]}' END,"
        f" 'stop', {TOKENS_IN}, {TOKENS_OUT}, 100.0 + r.line_number % 97, 'm', 'w', 1, false,"
        f" CURRENT_TIMESTAMP"
        f" FROM requests r JOIN chunks c ON c.id = r.chunk_id"
        f" WHERE r.job_id = :job AND c.status = 'done' ORDER BY r.id",  # a chunk's results together
        f"INSERT INTO scores (job_id, request_id, metric, value)"
        f" SELECT r.job_id, r.id, 'rouge_l', (r.line_number % 101) / 100.0"
        f" FROM requests r JOIN chunks c ON c.id = r.chunk_id"
        f" WHERE r.job_id = :job AND c.status = 'done' AND r.line_number % {FAIL_EVERY} <> 0"
        f" ORDER BY r.id",
    ]
    if dialect == "postgresql":  # MIN(a, b) is SQLite's two-argument min
        statements = [st.replace("MIN(", "LEAST(") for st in statements]
    with db.session() as s:
        for st in statements:
            s.execute(text(st), p)
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    return job_id


def best_of(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "median_s": statistics.median(times)}


def run_backend(
    name: str, url: str, requests: int, home: Path, repeat: int, report: bool, job: int | None = None
) -> dict[str, Any]:
    from sqlalchemy import func, select

    from lmjobs.db.models import Result
    from lmjobs.db.session import get_database
    from lmjobs.jobs.control import job_status, list_jobs
    from lmjobs.jobs.report import build_report

    home.mkdir(parents=True, exist_ok=True)
    env = cli_env(keep_lmjobs=False, LMJOBS_HOME=str(home), LMJOBS_DATABASE_URL=url)
    db = get_database(url)
    t0 = time.perf_counter()
    if job is None:
        timed(["db", "upgrade"], env)
        job = build_job(db, requests)
    out: dict[str, Any] = {"backend": name, "requests": requests, "build_s": time.perf_counter() - t0}

    def old_count() -> None:  # what status, list and report did before: count the results
        with db.session() as s:
            q = select(Result.status, func.count()).where(Result.job_id == job).group_by(Result.status)
            s.execute(q).all()  # fetched: SQLite computes the groups as they are read

    st = job_status(db, job)
    out["check"] = {"succeeded": st.succeeded, "failed": st.failed, "pending": st.pending}
    steps: dict[str, dict[str, float]] = {
        "count results (before)": best_of(old_count, repeat),
        "status (service, no tokens)": best_of(lambda: job_status(db, job, tokens=False), repeat),
        "status (service, tokens)": best_of(lambda: job_status(db, job), repeat),
        "list (service)": best_of(lambda: list_jobs(db, limit=20), repeat),
    }
    if report:
        steps["report (service)"] = best_of(lambda: build_report(db, job), 1)
    for label, args in (("status (CLI)", ["status", str(job), "--json"]), ("list (CLI)", ["list", "--json"])):
        seconds, peak, _ = timed(args, env)
        steps[label] = {"seconds": seconds, "peak_mb": peak}
    if report:
        seconds, peak, _ = timed(["report", str(job), "--json"], env)
        steps["report (CLI)"] = {"seconds": seconds, "peak_mb": peak}
    out["steps"] = steps
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--postgres", default="", help="an empty PostgreSQL database URL (skipped if not given)")
    ap.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    ap.add_argument("--sqlite", type=Path, help="the SQLite file [default: a temporary one]")
    ap.add_argument("--job", type=int, help="time this job, already built by an earlier run, instead")
    ap.add_argument("--no-report", action="store_true", help="skip `report` (a pass over every row)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lmjobs-follow-") as tmp:
        root = Path(tmp)
        if not args.no_sqlite:
            url = f"sqlite:///{args.sqlite or root / 'sqlite.db'}"
            runs.append(
                run_backend(
                    "sqlite", url, args.requests, root / "sqlite", args.repeat, not args.no_report, args.job
                )
            )
        if args.postgres:
            runs.append(
                run_backend(
                    "postgresql",
                    args.postgres,
                    args.requests,
                    root / "pg",
                    args.repeat,
                    not args.no_report,
                    args.job,
                )
            )
    print(f"a job of {args.requests:,} requests; services: best of {args.repeat}; CLI: one whole process")
    for r in runs:
        print(f"{r['backend']}: built in {r['build_s']:.0f} s; {r['check']}")
    print(f"{'step':<30}" + "".join(f"{r['backend']:>14}" for r in runs))
    for step in runs[0]["steps"] if runs else ():
        print(f"{step:<30}" + "".join(f"{r['steps'][step]['seconds']:>12.3f} s" for r in runs))
    if args.json_out:
        args.json_out.write_text(json.dumps({"requests": args.requests, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
