"""The submit service: every way a file becomes a job goes through here.

``lmjobs submit`` (:func:`submit_file`), ``lmjobs run`` (:func:`run_embedded`), cron
schedules (``jobs/schedules.py``) and the HTTP API build a :class:`SubmitOptions` with
:func:`make_options` and hand it to this module. The sampling defaults and their limits
live in ``jobs/params.py``; adding a job option is one edit in the CLI's option list and
one here (or in ``job_params``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lmjobs.db.session import Database
from lmjobs.jobs.chunks import ChunkContext
from lmjobs.jobs.cleanup import discard_dead_submits
from lmjobs.jobs.control import JobStatusReport, job_status
from lmjobs.jobs.dispatch import Publisher, dispatch
from lmjobs.jobs.embedded import ProgressFn, run_job_locally
from lmjobs.jobs.engine_api import GenerateFn
from lmjobs.jobs.errors import InputFileError, UsageError
from lmjobs.jobs.ingest import ReadProgressFn, SubmitReport, create_job, find_same_file
from lmjobs.jobs.inputs import TASKS, sha256_file
from lmjobs.jobs.settings import Settings, mask_secrets
from lmjobs.jobs.timeparse import parse_when


@dataclass
class SubmitOptions:
    task: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)  # jobs/params.job_params()
    chunk_size: int = 64
    priority: int = 0
    name: str | None = None
    strict: bool = False
    start_at: datetime | None = None
    finish_by: datetime | None = None
    max_line_bytes: int = 1_000_000
    schedule_id: int | None = None
    ingest_processes: int | None = None  # None: by the file's size and the cores (jobs/ingest.py)


def parse_time_option(text: str | None, flag: str) -> datetime | None:
    """``--start-at`` / ``--finish-by``: HH:MM or an ISO time; UsageError naming the flag."""
    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def make_options(
    settings: Settings,
    *,
    task: str,
    model: str | None,
    params: dict[str, Any],
    chunk_size: int | None = None,
    **rest: Any,
) -> SubmitOptions:
    """Options with the configured defaults (model, chunk size) filled in and checked."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "generate" and params.get("system_prompt"):
        raise UsageError(
            "--system-prompt does not apply to --task generate, which continues the prompt as is; "
            "use --task chat for a system turn"
        )
    size = chunk_size if chunk_size is not None else settings.chunk_size
    if size < 1:
        raise UsageError("--chunk-size must be at least 1")
    rest.setdefault("ingest_processes", settings.ingest_processes)
    return SubmitOptions(task=task, model=model or settings.model, params=params, chunk_size=size, **rest)


class RepeatSubmitError(InputFileError):
    """The same file (same content, same task) was submitted before; ``job_ids`` says as what."""

    def __init__(self, path: Path, job_ids: list[int], hint: str | None = None) -> None:
        self.job_ids = job_ids
        msg = f"{path} was already submitted as job {', '.join(map(str, job_ids))}"
        super().__init__(f"{msg}; {hint}" if hint else msg)


@dataclass
class SubmitOutcome:
    report: SubmitReport
    dispatched: int = 0
    # Why nothing could be dispatched now (the job is saved; beat or reconcile will).
    dispatch_error: str | None = None
    # Leftovers of interrupted submits of the same file, removed first.
    discarded: list[int] = field(default_factory=list)


def submit_file(
    db: Database,
    path: Path,
    opts: SubmitOptions,
    *,
    publish: Publisher | None,
    allow_repeat: bool = False,
    on_progress: ReadProgressFn | None = None,
) -> SubmitOutcome:
    """Ingest the file as a queued job and dispatch its first chunks.

    Raises :class:`RepeatSubmitError` when the same file was submitted before and
    ``allow_repeat`` is false; nothing is written then.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    sha = sha256_file(path)
    discarded = discard_dead_submits(db, sha256=sha, task=opts.task)
    same = find_same_file(db, sha, opts.task)
    if same and not allow_repeat:
        raise RepeatSubmitError(path, same)
    rep = create_job(db, path, opts, source_sha256=sha, on_progress=on_progress)
    outcome = SubmitOutcome(report=rep, discarded=discarded)
    if publish is None:
        return outcome
    try:
        outcome.dispatched = dispatch(db, publish)
    except Exception as exc:  # the job is saved; the tick dispatches it
        outcome.dispatch_error = mask_secrets(str(exc))
    return outcome


@dataclass
class EmbeddedRun:
    report: SubmitReport
    status: JobStatusReport


def run_embedded(
    db: Database,
    path: Path,
    opts: SubmitOptions,
    *,
    engine: Callable[[], tuple[GenerateFn, ChunkContext]],
    on_start: Callable[[SubmitReport], None] | None = None,
    on_chunk: ProgressFn | None = None,
) -> EmbeddedRun:
    """Ingest the file and run every chunk in this process (no Redis), through the same
    chunk service as the Celery task. ``engine`` loads the model once the file is accepted."""
    rep = create_job(db, Path(path), opts)
    if on_start is not None:
        on_start(rep)
    generate, ctx = engine()
    run_job_locally(db, rep.job_id, generate=generate, ctx=ctx, on_chunk=on_chunk)
    return EmbeddedRun(report=rep, status=job_status(db, rep.job_id))
