"""The bodies of the CLI commands: call one service each and render its answer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lmjobs.cli import context, render
from lmjobs.jobs.errors import BrokerError, InputFileError, LmjobsError
from lmjobs.jobs.settings import mask_secrets


def _when(text: str | None, flag: str):  # type: ignore[no-untyped-def]
    from lmjobs.jobs.timeparse import parse_when

    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError as exc:
        raise InputFileError(f"{flag}: {exc}") from None


def _options(task: str, model: str | None, params: dict, chunk_size: int | None, **kw: Any):  # type: ignore[no-untyped-def]
    from lmjobs.jobs.ingest import SubmitOptions

    s = context.settings()
    size = chunk_size if chunk_size is not None else s.chunk_size
    if size < 1:
        raise InputFileError("--chunk-size must be at least 1")
    return SubmitOptions(task=task, model=model or s.model, params=params, chunk_size=size, **kw)


def _report_rejects(rep: Any) -> None:
    for r in rep.rejects:
        render.warn(f"line {r.line_number}: {r.reason}")
    if rep.lines_rejected > len(rep.rejects):
        render.warn(
            f"... {rep.lines_rejected - len(rep.rejects)} more; see `lmjobs rejects {rep.job_id}`"
        )


def run_local(
    file: Path,
    *,
    task: str,
    model: str | None,
    params: dict,
    output: Path | None,
    fmt: str,
    force: bool,
    strict: bool,
    chunk_size: int | None,
    as_json: bool,
) -> None:
    from lmjobs.jobs.control import job_status
    from lmjobs.jobs.embedded import run_job_locally
    from lmjobs.jobs.export import FORMATS, open_output, write_results
    from lmjobs.jobs.ingest import create_job
    from lmjobs.worker.runtime import init_runtime

    if fmt not in FORMATS:
        raise InputFileError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    sink = open_output(output, force=force, binary=fmt == "parquet") if output else None
    db = context.database()
    opts = _options(task, model, params, chunk_size, strict=strict)
    rep = create_job(db, file, opts)
    _report_rejects(rep)
    rt = init_runtime(context.settings(), opts.model)
    done = 0
    with render.progress() as bar:
        t0 = time.perf_counter()
        task_id = bar.add_task(f"job {rep.job_id}", total=rep.requests_total, rate="")

        def on_chunk(outcome: Any) -> None:
            nonlocal done
            done += outcome.succeeded + outcome.failed
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task_id, completed=done, rate=f"{rate:.1f} req/s")

        run_job_locally(db, rep.job_id, generate=rt.generate, ctx=rt.ctx, on_chunk=on_chunk)
    st = job_status(db, rep.job_id)
    if sink is not None:
        with sink:
            write_results(db, rep.job_id, fmt, sink)
    if as_json:
        render.dump_json(st.to_json())
        return
    _status_table(st)
    if sink is None:
        from lmjobs.jobs.export import iter_result_rows

        rows = []
        for r in iter_result_rows(db, rep.job_id):
            rows.append(
                (r["line_number"], r["custom_id"], r["status"], r["output_text"] or r["error"])
            )
            if len(rows) >= 20:
                break
        render.table(["line", "id", "status", "output"], rows, title="results (first 20)")
    else:
        render.out.print(f"wrote {output}")


def submit(
    file: Path,
    *,
    task: str,
    model: str | None,
    params: dict,
    strict: bool,
    chunk_size: int | None,
    priority: int,
    name: str | None,
    start_at: str | None,
    finish_by: str | None,
    yes: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from lmjobs.jobs.dispatch import dispatch
    from lmjobs.jobs.ingest import create_job, find_same_file
    from lmjobs.jobs.inputs import sha256_file

    opts = _options(
        task,
        model,
        params,
        chunk_size,
        strict=strict,
        priority=priority,
        name=name,
        start_at=_when(start_at, "--start-at"),
        finish_by=_when(finish_by, "--finish-by"),
    )
    if dry_run:
        from lmjobs.cli import dryrun

        dryrun.show(file, opts, as_json=as_json)
        return
    db = context.database()
    if not file.is_file():
        raise InputFileError(f"{file}: no such file")
    sha = sha256_file(file)
    from lmjobs.jobs.cleanup import discard_dead_submits

    for old in discard_dead_submits(db, sha256=sha, task=task):
        render.warn(f"discarded job {old}: an interrupted submit of this file (never ran)")
    same = find_same_file(db, sha, task)
    if same and not yes:
        msg = f"{file} was already submitted as job {', '.join(map(str, same))}"
        if not sys.stdin.isatty():
            raise InputFileError(f"{msg}; pass --yes to submit it again")
        import typer

        if not typer.confirm(f"{msg}. Submit it again?", default=False):
            raise InputFileError(f"{msg}; not submitted")
    rep = create_job(db, file, opts, source_sha256=sha)
    _report_rejects(rep)
    sent = 0
    try:
        sent = dispatch(db, context.publisher())
    except Exception as exc:
        render.warn(
            f"job {rep.job_id} is saved but could not be dispatched now ({mask_secrets(str(exc))}); "
            "`lmjobs reconcile` or a running `lmjobs beat` will dispatch it"
        )
    if as_json:
        render.dump_json(
            {
                "job_id": rep.job_id,
                "status": rep.status,
                "requests": rep.requests_total,
                "rejected": rep.lines_rejected,
                "chunks": rep.chunks_total,
                "dispatched": sent,
            }
        )
    else:
        render.out.print(
            f"job {rep.job_id}: {rep.requests_total} requests in {rep.chunks_total} chunks, "
            f"{rep.lines_rejected} lines rejected, status {rep.status}"
        )
        print(rep.job_id)


def worker(*, model: str | None, loglevel: str, name: str | None) -> None:
    from lmjobs.jobs.queues import CONTROL_QUEUE
    from lmjobs.worker.runtime import init_runtime

    context.database()
    s = context.settings()
    rt = init_runtime(s, model or s.model)  # ModelLoadError: refuse to consume anything
    from lmjobs.worker.app import app

    render.err.print(
        f"worker for {rt.model_name} ({rt.info.device}, {rt.info.dtype}) on queue {rt.queue}"
    )
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-Q",
        f"{rt.queue},{CONTROL_QUEUE}",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]
    if name:
        argv += ["-n", name]
    app.worker_main(argv)


def beat(*, loglevel: str) -> None:
    from lmjobs.worker.app import app

    context.database()
    schedule = context.settings().home / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


def _latest_job(db: Any) -> int:
    from lmjobs.jobs.control import list_jobs

    jobs = list_jobs(db, limit=1)
    if not jobs:
        raise LmjobsError("no jobs yet")
    return jobs[0].id


def _status_table(st: Any) -> None:
    pct = 100.0 * st.done / st.requests_total if st.requests_total else 100.0
    render.kv_table(
        f"job {st.id}" + (f" ({st.name})" if st.name else ""),
        {
            "status": st.status,
            "task / model": f"{st.task} / {st.model}",
            "progress": f"{st.done}/{st.requests_total} ({pct:.1f}%)",
            "succeeded": st.succeeded,
            "failed": st.failed,
            "pending": st.pending,
            "lines rejected": st.lines_rejected,
            "tokens in / out": f"{st.input_tokens} / {st.output_tokens}",
            "tokens/s (out)": f"{st.output_tokens_per_s:.1f}" if st.output_tokens_per_s else "-",
            "elapsed": render.duration(st.elapsed_s),
            "ETA": render.duration(st.eta_s),
            "deduplicated": f"{st.deduplicated} generations saved" if st.deduplicated else "0",
            "chunks": ", ".join(f"{k} {v}" for k, v in sorted(st.chunks.items())),
        },
    )
    for reason, n in st.failures_by_reason.items():
        render.warn(f"{n} failed: {reason}")


def status(job: int | None, *, watch: bool, interval: float, as_json: bool) -> None:
    from lmjobs.db.models import JobStatus
    from lmjobs.jobs.control import job_status

    db = context.database()
    job_id = job if job is not None else _latest_job(db)
    st = job_status(db, job_id)
    if watch and not as_json:
        with render.progress() as bar:
            tid = bar.add_task(f"job {job_id}", total=st.requests_total, rate="")
            while True:
                st = job_status(db, job_id)
                rate = f"{st.output_tokens_per_s:.0f} tok/s" if st.output_tokens_per_s else ""
                bar.update(tid, completed=st.done, rate=f"{st.status} {rate}")
                if JobStatus(st.status).is_finished or st.status == JobStatus.PAUSED.value:
                    break
                time.sleep(interval)
    if as_json:
        render.dump_json(st.to_json())
    else:
        _status_table(st)


def list_jobs(*, limit: int, state: str | None, as_json: bool) -> None:
    from lmjobs.jobs.control import list_jobs as service

    jobs = service(context.database(), limit=limit, status=state)
    if as_json:
        render.dump_json([j.to_json() for j in jobs])
        return
    render.table(
        ["id", "status", "task", "model", "done", "failed", "rejected", "created"],
        [
            (
                j.id,
                j.status,
                j.task,
                j.model,
                f"{j.done}/{j.requests_total}",
                j.failed,
                j.lines_rejected,
                j.created_at.strftime("%Y-%m-%d %H:%M"),
            )
            for j in jobs
        ],
    )


def results(job: int, *, fmt: str, output: Path | None, force: bool, only_finished: bool) -> None:
    from lmjobs.jobs.control import get_job
    from lmjobs.jobs.export import FORMATS, open_output, write_results

    if fmt not in FORMATS:
        raise InputFileError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    db = context.database()
    get_job(db, job)
    if output is None:
        if fmt == "parquet":
            raise InputFileError("parquet needs --output FILE")
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
        render.table(
            ["line", "reason", "excerpt"], [(r.line_number, r.reason, r.excerpt) for r in rows]
        )


def cancel(job: int, *, as_json: bool) -> None:
    from lmjobs.jobs.control import cancel_job

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
    from lmjobs.jobs.control import retry_job

    db = context.database()
    n = retry_job(db, job)
    sent = _redispatch(db) if n else 0
    if as_json:
        render.dump_json({"job_id": job, "retrying": n, "dispatched": sent})
    else:
        render.out.print(f"job {job}: {n} failed requests queued again")


def resume(job: int, *, finish_by: str | None, as_json: bool) -> None:
    from lmjobs.jobs.control import resume_job

    db = context.database()
    n = resume_job(db, job, finish_by=_when(finish_by, "--finish-by"))
    sent = _redispatch(db)
    if as_json:
        render.dump_json({"job_id": job, "pending": n, "dispatched": sent})
    else:
        render.out.print(f"job {job} resumed: {n} requests to go")


def reconcile(*, as_json: bool) -> None:
    from dataclasses import asdict

    from lmjobs.jobs.dispatch import tick
    from lmjobs.worker.broker import redis_chunk_ids

    db = context.database()
    s = context.settings()
    try:
        rep = tick(db, context.publisher(), broker_view=lambda: redis_chunk_ids(s.broker_url))
    except Exception as exc:
        if isinstance(exc, LmjobsError):
            raise
        raise BrokerError(
            f"reconcile could not reach the broker: {mask_secrets(str(exc))}"
        ) from None
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
        raise InputFileError(f"unknown format {fmt!r}; choose table, csv or json")
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
