"""The commands that make and run jobs: ``run`` (embedded), ``submit``, ``worker``, ``beat``.

Each parses, calls one service (``jobs/submit.py``, the worker runtime, the reconciler's loop)
and renders; following and managing jobs is in ``cli/commands.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from lmjobs.cli import context, render
from lmjobs.cli.commands import check_format, exit_for, status_table


def _report_rejects(rep: Any) -> None:
    for r in rep.rejects:
        render.warn(escape(f"line {r.line_number}: {r.reason}"))
    if rep.lines_rejected > len(rep.rejects):
        render.warn(f"... {rep.lines_rejected - len(rep.rejects)} more; see `lmjobs rejects {rep.job_id}`")
    if rep.model_mismatches and rep.first_model_mismatch is not None:
        line, asked = rep.first_model_mismatch
        n = rep.model_mismatches
        render.warn(
            escape(
                f"{n} line{'s' if n != 1 else ''} ask for a model other than the job's {rep.model!r}, "
                f"which runs them; the first: line {line} asks for {asked!r} (--strict refuses such a file)"
            )
        )


def _options(task: str, model: str | None, job: dict[str, Any], chunk_size: int | None, **kw: Any) -> Any:
    from lmjobs.jobs.params import job_params
    from lmjobs.jobs.submit import make_options

    return make_options(
        context.settings(), task=task, model=model, params=job_params(**job), chunk_size=chunk_size, **kw
    )


def run_local(
    file: Path,
    *,
    task: str,
    model: str | None,
    job: dict[str, Any],
    output: Path | None,
    fmt: str,
    force: bool,
    strict: bool,
    chunk_size: int | None,
    as_json: bool,
) -> None:
    from lmjobs.jobs.export import iter_result_rows, open_output, write_results
    from lmjobs.jobs.submit import run_embedded
    from lmjobs.worker.runtime import init_runtime

    check_format(fmt)
    opts = _options(task, model, job, chunk_size, strict=strict)
    sink = open_output(output, force=force, binary=fmt == "parquet") if output else None
    db = context.database()

    def engine() -> Any:
        rt = init_runtime(context.settings(), opts.model)
        return rt.generate, rt.ctx

    with render.progress() as bar:
        t0 = time.perf_counter()
        done = 0
        task_id: Any = None

        def on_start(rep: Any) -> None:
            nonlocal task_id
            _report_rejects(rep)
            task_id = bar.add_task(f"job {rep.job_id}", total=rep.requests_total, rate="")

        def on_chunk(outcome: Any) -> None:
            nonlocal done
            done += outcome.succeeded + outcome.failed
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task_id, completed=done, rate=f"{rate:.1f} req/s")

        ran = run_embedded(db, file, opts, engine=engine, on_start=on_start, on_chunk=on_chunk)
    st = ran.status
    if sink is not None:
        with sink:
            write_results(db, st.id, fmt, sink)
    if as_json:
        render.dump_json(st.to_json())
    else:
        status_table(st)
        if sink is None:
            rows = []
            for r in iter_result_rows(db, st.id):
                rows.append((r["line_number"], r["custom_id"], r["status"], r["output_text"] or r["error"]))
                if len(rows) >= 20:
                    break
            render.table(["line", "id", "status", "output"], rows, title="results (first 20)")
        else:
            render.out.print(f"wrote {output}")
    exit_for(st)


def submit(
    file: Path,
    *,
    task: str,
    model: str | None,
    job: dict[str, Any],
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
    from lmjobs.jobs.submit import RepeatSubmitError, parse_time_option, submit_file

    opts = _options(
        task,
        model,
        job,
        chunk_size,
        strict=strict,
        priority=priority,
        name=name,
        start_at=parse_time_option(start_at, "--start-at"),
        finish_by=parse_time_option(finish_by, "--finish-by"),
    )
    if dry_run:
        from lmjobs.cli import dryrun

        dryrun.show(file, opts, as_json=as_json)
        return
    db = context.database()
    size = file.stat().st_size if file.is_file() else 0
    with render.submit_progress() as bar:
        t0 = time.perf_counter()
        tid = bar.add_task("submit", total=size, lines=0, rate=0, rejected=0)

        def on_progress(bytes_read: int, lines: int, rejected: int) -> None:
            rate = f"{lines / max(time.perf_counter() - t0, 1e-9):,.0f}"
            bar.update(tid, completed=bytes_read, lines=f"{lines:,}", rate=rate, rejected=f"{rejected:,}")

        def send(allow_repeat: bool) -> Any:
            return submit_file(
                db,
                file,
                opts,
                publish=context.publisher(),
                allow_repeat=allow_repeat,
                on_progress=on_progress,
            )

        try:
            outcome = send(yes)
        except RepeatSubmitError as exc:
            if not sys.stdin.isatty():
                raise RepeatSubmitError(file, exc.job_ids, "pass --yes to submit it again") from None
            bar.stop()
            if not typer.confirm(f"{exc}. Submit it again?", default=False):
                raise RepeatSubmitError(file, exc.job_ids, "not submitted") from None
            bar.start()
            outcome = send(True)
    for old in outcome.discarded:
        render.warn(f"discarded job {old}: an interrupted submit of this file (never ran)")
    rep = outcome.report
    _report_rejects(rep)
    if outcome.dispatch_error is not None:
        render.warn(
            f"job {rep.job_id} is saved but could not be dispatched now ({outcome.dispatch_error}); "
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
                "dispatched": outcome.dispatched,
                "model_mismatches": rep.model_mismatches,
                "first_model_mismatch": (
                    {"line": rep.first_model_mismatch[0], "model": rep.first_model_mismatch[1]}
                    if rep.first_model_mismatch
                    else None
                ),
            }
        )
    else:
        render.out.print(
            f"job {rep.job_id}: {rep.requests_total} requests in {rep.chunks_total} chunks, "
            f"{rep.lines_rejected} lines rejected, status {rep.status}"
        )
        print(rep.job_id)


def worker(*, model: str | None, loglevel: str, name: str | None) -> None:
    from lmjobs.worker.runtime import init_runtime

    context.database()
    s = context.settings()
    rt = init_runtime(s, model or s.model)  # ModelLoadError: refuse to consume anything
    from lmjobs.worker.app import app

    render.err.print(f"worker for {rt.model_name} ({rt.info.device}, {rt.info.dtype}) on queue {rt.queue}")
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-Q",
        rt.queue,  # its model's chunks only: the periodic tick runs in `lmjobs beat`
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]
    if name:
        argv += ["-n", name]
    app.worker_main(argv)


def beat(*, loglevel: str) -> None:
    import logging

    from lmjobs.jobs.reconcile import TICK_SECONDS, run_forever
    from lmjobs.jobs.retry import with_db_retry
    from lmjobs.worker.broker import redis_chunk_ids

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    db = context.database()
    s = context.settings()
    render.err.print(f"beat: a tick every {TICK_SECONDS:g} s (reconciler, schedules, dispatch); no model")
    run_forever(
        db,
        context.publisher(),
        broker_view=lambda: redis_chunk_ids(s.broker_url),
        interval_s=TICK_SECONDS,
        retry=with_db_retry,
    )
