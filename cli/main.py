"""The ``lmjobs`` command. Each command parses, calls one service, renders.

Errors of the user's making (``LmjobsError``) are one line on stderr and a non-zero exit
code, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from lmjobs.cli import context, plain_params, render
from lmjobs.cli.options import job_options
from lmjobs.db.urls import mask_secrets
from lmjobs.jobs.errors import LmjobsError

# Plainly written option values are read without pydantic (cli/plain_params.py).
plain_params.install()

app = typer.Typer(
    name="lmjobs",
    help="Batch inference for language models: durable jobs, Celery workers, SQL results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Options shared by `run` and `submit` that are not job parameters (cli/options.py has those).
TaskOpt = typer.Option(..., "--task", "-t", help="translate, summarize, qa, generate or chat")
ModelOpt = typer.Option(None, "--model", "-m", help="HF id, local path or alias [default: LMJOBS_MODEL]")
Strict = typer.Option(False, "--strict", help="Refuse the whole file if any line is malformed")
ChunkSize = typer.Option(None, "--chunk-size", help="Requests per chunk [default: LMJOBS_CHUNK_SIZE]")
JsonOut = typer.Option(False, "--json", help="Machine-readable output")


@app.command()
@job_options
def run(
    file: Path = typer.Argument(..., help="JSONL prompts"),
    task: str = TaskOpt,
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here"),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl, csv, parquet or openai"),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists"),
    model: str | None = ModelOpt,
    strict: bool = Strict,
    chunk_size: int | None = ChunkSize,
    as_json: bool = JsonOut,
    *,
    job: dict[str, Any],
) -> None:
    """Run a file to completion in this process (no Redis needed) and print or write results."""
    from lmjobs.cli import running

    running.run_local(
        file,
        task=task,
        model=model,
        job=job,
        output=output,
        fmt=fmt,
        force=force,
        strict=strict,
        chunk_size=chunk_size,
        as_json=as_json,
    )


@app.command()
@job_options
def submit(
    file: Path = typer.Argument(..., help="JSONL prompts"),
    task: str = TaskOpt,
    model: str | None = ModelOpt,
    strict: bool = Strict,
    chunk_size: int | None = ChunkSize,
    priority: int = typer.Option(0, "--priority", help="Higher runs first"),
    name: str | None = typer.Option(None, "--name"),
    start_at: str | None = typer.Option(None, "--start-at", help="HH:MM or ISO time; held until then"),
    finish_by: str | None = typer.Option(None, "--finish-by", help="Deadline: HH:MM or ISO time"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Submit even if the same file was submitted before"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read and count, submit nothing"),
    as_json: bool = JsonOut,
    *,
    job: dict[str, Any],
) -> None:
    """Queue a job for the workers and print its id."""
    from lmjobs.cli import running

    running.submit(
        file,
        task=task,
        model=model,
        job=job,
        strict=strict,
        chunk_size=chunk_size,
        priority=priority,
        name=name,
        start_at=start_at,
        finish_by=finish_by,
        yes=yes,
        dry_run=dry_run,
        as_json=as_json,
    )


@app.command()
def worker(
    model: str | None = ModelOpt,
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    name: str | None = typer.Option(None, "--name", "-n", help="Celery node name"),
) -> None:
    """Start a Celery worker for one model (one per GPU: set CUDA_VISIBLE_DEVICES)."""
    from lmjobs.cli import running

    running.worker(model=model, loglevel=loglevel, name=name)


@app.command()
def beat(loglevel: str = typer.Option("INFO", "--loglevel", "-l")) -> None:
    """The control process: the periodic reconciler, cron schedules and dispatch (no model)."""
    from lmjobs.cli import running

    running.beat(loglevel=loglevel)


@app.command()
def status(
    job: int | None = typer.Argument(None, help="Job id [default: the latest job]"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the job finishes"),
    wait: bool = typer.Option(
        False, "--wait", help="Block until the job ends; exit 0, 3 (some failed), 4 (failed), 5, 6"
    ),
    interval: float = typer.Option(2.0, "--interval"),
    as_json: bool = JsonOut,
) -> None:
    """Counts, progress, tokens/s and ETA of a job."""
    from lmjobs.cli import commands

    commands.status(job, watch=watch, wait=wait, interval=interval, as_json=as_json)


@app.command("list")
def list_(
    limit: int = typer.Option(20, "--limit", "-n"),
    state: str | None = typer.Option(None, "--status", help="Only jobs in this status"),
    as_json: bool = JsonOut,
) -> None:
    """The latest jobs."""
    from lmjobs.cli import commands

    commands.list_jobs(limit=limit, state=state, as_json=as_json)


@app.command()
def results(
    job: int = typer.Argument(...),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl, csv, parquet or openai"),
    output: Path | None = typer.Option(None, "--output", "-o", help="File to write [default: stdout]"),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists"),
    only_finished: bool = typer.Option(False, "--only-finished", help="Leave out pending requests"),
) -> None:
    """Export a job's results (partial results of a running job included)."""
    from lmjobs.cli import commands

    commands.results(job, fmt=fmt, output=output, force=force, only_finished=only_finished)


@app.command()
def rejects(job: int = typer.Argument(...), as_json: bool = JsonOut) -> None:
    """The malformed input lines of a job, with line numbers and reasons."""
    from lmjobs.cli import commands

    commands.rejects(job, as_json=as_json)


@app.command()
def cancel(job: int = typer.Argument(...), as_json: bool = JsonOut) -> None:
    """Stop dispatching a job; chunks already running finish."""
    from lmjobs.cli import commands

    commands.cancel(job, as_json=as_json)


@app.command()
def retry(job: int = typer.Argument(...), as_json: bool = JsonOut) -> None:
    """Run again only the failed requests of a job."""
    from lmjobs.cli import commands

    commands.retry(job, as_json=as_json)


@app.command()
def resume(
    job: int = typer.Argument(...),
    finish_by: str | None = typer.Option(None, "--finish-by", help="A new deadline"),
    as_json: bool = JsonOut,
) -> None:
    """Continue a job paused at its deadline (or re-dispatch a stalled one)."""
    from lmjobs.cli import commands

    commands.resume(job, finish_by=finish_by, as_json=as_json)


@app.command()
def reconcile(as_json: bool = JsonOut) -> None:
    """One pass of the reconciler: requeue lost chunks, start due jobs, dispatch."""
    from lmjobs.cli import commands

    commands.reconcile(as_json=as_json)


@app.command()
def cleanup(
    idle: float = typer.Option(5.0, "--idle", help="Seconds without progress that mark a submit as dead"),
    as_json: bool = JsonOut,
) -> None:
    """Remove jobs left `submitting` by an interrupted submit (they never run)."""
    from lmjobs.cli import commands

    commands.cleanup(idle_s=idle, as_json=as_json)


@app.command()
def query(
    sql: str = typer.Argument(..., help="One read-only SQL statement"),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json"),
    as_json: bool = JsonOut,
    limit: int = typer.Option(0, "--limit", help="Stop after this many rows (0: all)"),
) -> None:
    """Read-only SQL on the results store (writes, DDL, ATTACH, PRAGMA are refused)."""
    from lmjobs.cli import commands

    commands.query(sql, fmt="json" if as_json else fmt, limit=limit)


# `report` and `schedule add|list|remove` (cli/analytics.py)
from lmjobs.cli import analytics, api_commands  # noqa: E402

analytics.register(app)
api_commands.register(app)  # serve, keys create|list|revoke (cli/api_commands.py)


@app.command()
def bench(
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="cpu-smollm2, cpu-tiny, gpu, or features (output formats and n samples) [default: cpu-smollm2]",
    ),
    requests: int | None = typer.Option(None, "--requests", "-n", help="Requests per arm"),
    arms: str | None = typer.Option(
        None, "--arms", help="A0,A1,A2 (static),A3 (continuous),A4 (int8),A5 (compile),E2E"
    ),
    workload: str | None = typer.Option(None, "--workload", "-w", help="fixed, mixed or tasks"),
    json_out: Path | None = typer.Option(None, "--json-out", help="Write the report here"),
    device: str | None = typer.Option(None, "--device"),
    dtype: str | None = typer.Option(None, "--dtype"),
    baseline_dtype: str | None = typer.Option(
        None, "--baseline-dtype", help="A0 and A1's dtype (a second model copy) [cpu-smollm2: float32]"
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="Alias, HF id, folder or random:<shape>"),
    a0_requests: int | None = typer.Option(None, "--a0-requests", help="A0 on first N (0: all)"),
    a1_requests: int | None = typer.Option(None, "--a1-requests", help="A1 on first N (0: all)"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (worker too)"),
    chunk_size: int | None = typer.Option(None, "--chunk-size", help="E2E chunk size"),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size"),
    e2e_db: str | None = typer.Option(None, "--e2e-db", help="E2E database URL [default: SQLite]"),
    e2e_broker: str | None = typer.Option(None, "--e2e-broker", help="E2E Redis URL"),
    profile: bool = typer.Option(False, "--profile", help="Add a torch.profiler table"),
    budget_s: float | None = typer.Option(None, "--budget-s", help="Skip arms starting later"),
    seed: int | None = typer.Option(None, "--seed"),
    markdown: bool = typer.Option(False, "--markdown", help="The arms table as Markdown"),
    as_json: bool = JsonOut,
) -> None:
    """Benchmark the engine against naive model.generate loops (and the queue end to end)."""
    from lmjobs.cli.bench import bench as run_bench

    run_bench(
        preset=preset,
        requests=requests,
        arms=arms,
        workload=workload,
        json_out=json_out,
        device=device,
        dtype=dtype,
        baseline_dtype=baseline_dtype,
        model=model,
        a0_requests=a0_requests,
        a1_requests=a1_requests,
        threads=threads,
        chunk_size=chunk_size,
        max_batch_size=max_batch_size,
        e2e_database_url=e2e_db,
        e2e_broker_url=e2e_broker,
        profile=profile,
        budget_s=budget_s,
        seed=seed,
        as_json=as_json,
        markdown_table=markdown,
    )


db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION."""
    from lmjobs.cli import commands

    commands.db_upgrade(revision)


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision of the configured database."""
    from lmjobs.cli import commands

    commands.db_current()


@app.command()
def config(as_json: bool = JsonOut) -> None:
    """The effective settings (passwords masked)."""
    s = context.settings().masked()
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        render.kv_table("settings", s)


def main() -> None:
    try:
        # Without standalone mode, click returns a command's typer.Exit code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except LmjobsError as exc:
        render.error(mask_secrets(str(exc)))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        render.error("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        render.error("interrupted")
        sys.exit(130)
    except Exception as exc:
        # Usage errors (bad option values): Typer's click raises them with show() and an
        # exit code of 2; anything else is a bug and keeps its traceback.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
