"""The bodies of the CLI commands: call one service each and render its answer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from lmjobs.cli import context, render
from lmjobs.db.urls import mask_secrets
from lmjobs.jobs.errors import BrokerError, LmjobsError, UsageError


def check_format(fmt: str) -> None:
    from lmjobs.jobs.export import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# Exit codes of `run` and `status --wait` (README, "Exit codes"): scripts can tell a clean
# job from one with failed rows and from one that stopped. 1 is an error of lmjobs itself
# (bad file, unreachable database), 2 a usage error.
EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_JOB_FAILED = 4
EXIT_CANCELLED = 5
EXIT_PAUSED = 6


def job_exit_code(status: str) -> int:
    from lmjobs.db.tables import JobStatus

    return {
        JobStatus.COMPLETED.value: EXIT_OK,
        JobStatus.COMPLETED_WITH_FAILURES.value: EXIT_SOME_FAILED,
        JobStatus.FAILED.value: EXIT_JOB_FAILED,
        JobStatus.CANCELLED.value: EXIT_CANCELLED,
        JobStatus.PAUSED.value: EXIT_PAUSED,
    }.get(status, EXIT_OK)


def exit_for(st: Any) -> None:
    code = job_exit_code(st.status)
    if code:
        raise typer.Exit(code)


def _latest_job(db: Any) -> int:
    from lmjobs.jobs.control import list_jobs

    jobs = list_jobs(db, limit=1)
    if not jobs:
        raise LmjobsError("no jobs yet")
    return jobs[0].id


def status_table(st: Any) -> None:
    pct = 100.0 * st.done / st.requests_total if st.requests_total else 100.0
    render.kv_table(
        f"job {st.id}" + (f" ({st.name})" if st.name else ""),
        {
            "status": st.status + (f": {st.error}" if st.error else ""),
            "task": st.task,
            "model": st.model,
            "progress": f"{st.done}/{st.requests_total} ({pct:.1f}%)",
            "succeeded": st.succeeded,
            "failed": st.failed,
            "pending": st.pending,
            "lines rejected": st.lines_rejected,
            "tokens in / out": f"{st.input_tokens} / {st.output_tokens}",
            "tokens/s (out)": f"{st.output_tokens_per_s:.1f}" if st.output_tokens_per_s else "-",
            "elapsed": render.duration(st.elapsed_s),
            "ETA": render.duration(st.eta_s),
            "deduplicated": f"{st.deduplicated} requests copied, not generated" if st.deduplicated else "0",
            "chunks": ", ".join(f"{k} {v}" for k, v in sorted(st.chunks.items())),
            **{f"{m} (mean)": f"{v:.3f}" if v < 10 else f"{v:.2f}" for m, v in st.scores.items()},
        },
    )
    if st.scores_sampled:
        render.warn(
            f"(mean scores over a sample: the scores of {st.scores_sample_requests} requests"
            " from chunks spread over the job)"
        )
    for reason, n in st.failures_by_reason.items():
        render.warn(f"{n} failed: {reason}")
    if st.failures_by_reason and st.failures_counted < st.failed:
        render.warn(f"(reasons counted over the first {st.failures_counted} of {st.failed} failed requests)")


# `status --watch` / `--wait`: each refresh reads the job's chunks (a few indexed queries on
# one pooled connection), never its results; faster than this would only load the database.
MIN_INTERVAL_S = 0.2


def status(job: int | None, *, watch: bool, wait: bool, interval: float, as_json: bool) -> None:
    from lmjobs.db.tables import JobStatus
    from lmjobs.jobs.control import job_status

    def ended(status: str) -> bool:
        return JobStatus(status).is_finished or status == JobStatus.PAUSED.value

    if (watch or wait) and not interval >= MIN_INTERVAL_S:
        raise UsageError(f"--interval must be at least {MIN_INTERVAL_S} seconds (got {interval})")
    with context.collector_paused(not (watch or wait)):  # a watch can run for hours
        db = context.database()
        job_id = job if job is not None else _latest_job(db)
        if watch and not as_json:
            st = job_status(db, job_id, tokens=False)
            with render.progress() as bar:
                tid = bar.add_task(f"job {job_id}", total=st.requests_total, rate="")
                while True:
                    st = job_status(db, job_id, tokens=False)
                    rate = (
                        f"{st.output_tokens_per_s:.1f} tok/s, {st.requests_per_s:.1f} req/s"
                        if st.requests_per_s and st.output_tokens_per_s is not None
                        else ""
                    )
                    bar.update(tid, completed=st.done, rate=f"{st.status} {rate}")
                    if ended(st.status):
                        break
                    time.sleep(interval)
        elif wait:
            st = job_status(db, job_id, tokens=False)
            while not ended(st.status):
                time.sleep(interval)
                st = job_status(db, job_id, tokens=False)
        st = job_status(db, job_id)  # once, with the token totals
        if as_json:
            render.dump_json(st.to_json())
        else:
            status_table(st)
        if wait:
            exit_for(st)


@context.collector_paused()
def list_jobs(*, limit: int, state: str | None, as_json: bool) -> None:
    from lmjobs.jobs.control import list_jobs as service

    jobs = service(context.database(), limit=limit, status=state)
    if as_json:
        render.dump_json([j.to_json() for j in jobs])
        return
    render.table(
        ["id", "status", "task", "model", "done", "failed", "created"],
        [
            (
                j.id,
                j.status,
                j.task,
                j.model,
                f"{j.done}/{j.requests_total}",
                j.failed,
                j.created_at.strftime("%m-%d %H:%M"),
            )
            for j in jobs
        ],
        squeeze="model",
    )


def results(job: int, *, fmt: str, output: Path | None, force: bool, only_finished: bool) -> None:
    from lmjobs.jobs.control import get_job
    from lmjobs.jobs.export import open_output, write_results

    check_format(fmt)
    db = context.database()
    get_job(db, job)
    if output is None:
        if fmt == "parquet":
            raise UsageError("parquet needs --output FILE")
        write_results(db, job, fmt, sys.stdout, only_finished=only_finished)
        return
    with open_output(output, force=force, binary=fmt == "parquet") as fh:
        n = write_results(db, job, fmt, fh, only_finished=only_finished)
    render.err.print(f"wrote {n} rows to {output}")


def rejects(job: int, *, as_json: bool) -> None:
    from lmjobs.jobs.control import get_job, job_rejects

    db = context.database()
    get_job(db, job)
    rows = job_rejects(db, job)
    if as_json:
        render.dump_json(
            [{"line_number": r.line_number, "reason": r.reason, "excerpt": r.excerpt} for r in rows]
        )
    else:
        render.table(["line", "reason", "excerpt"], [(r.line_number, r.reason, r.excerpt) for r in rows])


def cancel(job: int, *, as_json: bool) -> None:
    from lmjobs.jobs.lifecycle import cancel_job

    n = cancel_job(context.database(), job)
    if as_json:
        render.dump_json({"job_id": job, "status": "cancelled", "chunks_cancelled": n})
    else:
        render.out.print(f"job {job} cancelled ({n} chunks will not run)")


def _redispatch(db: Any) -> int:
    from lmjobs.jobs.dispatch import dispatch

    try:
        return dispatch(db, context.publisher())
    except Exception as exc:
        render.warn(f"could not dispatch now ({mask_secrets(str(exc))}); `lmjobs reconcile` will")
        return 0


def retry(job: int, *, as_json: bool) -> None:
    from lmjobs.jobs.lifecycle import retry_job

    db = context.database()
    n = retry_job(db, job)
    sent = _redispatch(db) if n else 0
    if as_json:
        render.dump_json({"job_id": job, "retrying": n, "dispatched": sent})
    else:
        render.out.print(f"job {job}: {n} failed requests queued again")


def resume(job: int, *, finish_by: str | None, as_json: bool) -> None:
    from lmjobs.jobs.lifecycle import resume_job

    db = context.database()
    from lmjobs.jobs.submit import parse_time_option

    n = resume_job(db, job, finish_by=parse_time_option(finish_by, "--finish-by"))
    sent = _redispatch(db)
    if as_json:
        render.dump_json({"job_id": job, "pending": n, "dispatched": sent})
    else:
        render.out.print(f"job {job} resumed: {n} requests to go")


def reconcile(*, as_json: bool) -> None:
    from dataclasses import asdict

    from lmjobs.jobs.reconcile import tick
    from lmjobs.worker.broker import redis_chunk_ids

    db = context.database()
    s = context.settings()
    try:
        rep = tick(db, context.publisher(), broker_view=lambda: redis_chunk_ids(s.broker_url))
    except Exception as exc:
        if isinstance(exc, LmjobsError):
            raise
        raise BrokerError(f"reconcile could not reach the broker: {mask_secrets(str(exc))}") from None
    if as_json:
        render.dump_json(asdict(rep))
    else:
        render.kv_table("reconcile", asdict(rep))


def cleanup(*, idle_s: float, as_json: bool) -> None:
    from lmjobs.jobs.cleanup import discard_dead_submits, incomplete_submits

    db = context.database()
    gone = discard_dead_submits(db, idle_s=idle_s)
    alive = incomplete_submits(db)
    if as_json:
        render.dump_json({"discarded": gone, "still_submitting": alive})
        return
    for job_id in gone:
        render.out.print(f"discarded job {job_id}: an interrupted submit")
    for job_id in alive:
        render.warn(f"job {job_id} is still being submitted (it wrote in the last {idle_s:g} s)")
    if not gone and not alive:
        render.out.print("nothing to clean up")


def query(sql: str, *, fmt: str, limit: int) -> None:
    import csv

    from lmjobs.db.readonly import run_readonly_query

    if fmt not in ("table", "csv", "json"):
        raise UsageError(f"unknown format {fmt!r}; choose table, csv or json")
    s = context.settings()
    url = s.query_database_url or s.database_url
    context.database()
    with run_readonly_query(url, sql, timeout_s=s.query_timeout_s) as res:
        rows = res.rows
        if limit:
            import itertools

            rows = itertools.islice(rows, limit)
        if fmt == "csv":
            w = csv.writer(sys.stdout)
            w.writerow(res.columns)
            for r in rows:
                w.writerow(r)
        elif fmt == "json":
            sys.stdout.write("[")
            for i, r in enumerate(rows):
                sys.stdout.write(
                    ("," if i else "")
                    + "\n  "
                    + json.dumps(
                        dict(zip(res.columns, r, strict=True)), default=render._default, ensure_ascii=False
                    )
                )
            sys.stdout.write("\n]\n")
        else:
            render.table(res.columns, rows)


def db_upgrade(revision: str) -> None:
    from lmjobs.db.migrate import upgrade
    from lmjobs.jobs.settings import mask_url

    url = context.settings().database_url
    try:
        upgrade(url, revision)
    except Exception as exc:
        raise LmjobsError(
            f"migration failed on {mask_url(url)}: {mask_secrets(str(exc).splitlines()[0])}"
        ) from None
    render.out.print(f"database at {mask_url(url)} is at {revision}")


def db_current() -> None:
    from lmjobs.db.migrate import current_revision, head_revision

    url = context.settings().database_url
    cur = current_revision(url)
    render.out.print(f"current: {cur or 'empty'}; head: {head_revision()}")
