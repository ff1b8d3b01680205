"""Submit: stream an input file into a job, its requests, its rejects and its chunks.

The file is read once, line by line, and written in chunk-sized batches, so memory does
not grow with the file. The job stays ``submitting`` until the last request is written:
an interrupted submit never looks complete, and ``jobs/cleanup.py`` removes it.
Duplicate ids are found by the database's unique key (insert-or-ignore, then a count per
chunk tells which chunks lost lines), so no set of ids is kept in memory.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.orm import Session

from lmjobs.db.models import Chunk, ChunkStatus, Job, JobStatus, Reject, Request, utcnow
from lmjobs.db.session import Database, analyze_after_bulk_load
from lmjobs.db.upsert import bulk_insert_ignore, insert_ignore_many
from lmjobs.jobs.errors import InputFileError, UsageError
from lmjobs.jobs.inputs import TASKS, LineError, ParsedRequest, ReadProgress, read_requests, sha256_file
from lmjobs.jobs.lifecycle import discard_job, mark_ready
from lmjobs.jobs.params import sampling_params
from lmjobs.jobs.queues import queue_for_model
from lmjobs.jobs.templates import TEMPLATE_VERSIONS, content_hash, render

if TYPE_CHECKING:  # the submit service owns the options and calls this module
    from lmjobs.jobs.submit import SubmitOptions

MAX_REPORTED_REJECTS = 20


@dataclass
class SubmitReport:
    job_id: int
    requests_total: int
    lines_rejected: int
    chunks_total: int
    status: str
    rejects: list[LineError] = field(default_factory=list)  # the first MAX_REPORTED_REJECTS
    model: str = ""  # the job's model
    # Accepted lines whose requested model (OpenAI body.model) is not the job's model (which
    # runs them anyway), and the first of them as (line number, requested model).
    model_mismatches: int = 0
    first_model_mismatch: tuple[int, str] | None = None


def model_mismatch(p: ParsedRequest, job_model: str) -> bool:
    """The line asks for a model other than the job's (compared as written: an alias and the
    id it stands for differ)."""
    return p.model is not None and p.model != job_model


def _check_options(path: Path, opts: SubmitOptions) -> None:
    if opts.task not in TASKS:
        raise UsageError(f"unknown task {opts.task!r}; choose one of {', '.join(TASKS)}")
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if not path.is_file():
        raise InputFileError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: the file is empty")


def _request_row(
    job_id: int, p: ParsedRequest, opts: SubmitOptions, effective: dict[str, Any] | None
) -> dict[str, Any]:
    """Raises ValueError when the task template refuses the fields (e.g. no target language).
    ``effective``: the job's sampling params as a dict, reused for lines without their own."""
    rendered = render(p.task, p.input, opts.params)
    if effective is None or p.params:
        effective = sampling_params(opts.params, p.params).to_dict()
    return {
        "job_id": job_id,
        "line_number": p.line_number,
        "custom_id": p.custom_id,
        "task": p.task,
        "input_json": p.input,
        "params_json": p.params,
        "reference": p.reference,
        "requested_model": p.model,
        "content_sha256": content_hash(p.task, rendered, effective),
        "isolated_attempts": 0,
    }


# Requests written per transaction: few commits (each is an fsync on SQLite), bounded memory.
FLUSH_ROWS = 4096


class _Writer:
    """Buffers parsed lines into chunks and writes many chunks per transaction, each table
    with one cached statement executed with many rows (no SQL compiled per batch)."""

    def __init__(self, db: Database, job: Job, opts: SubmitOptions) -> None:
        self.db, self.job, self.opts = db, job, opts
        self.batch: list[ParsedRequest] = []  # the chunk being filled
        self.full: list[list[ParsedRequest]] = []  # chunks waiting to be written
        self.rejects: list[LineError] = []
        self.pending_rejects: list[dict[str, Any]] = []
        self.accepted = 0
        self.rejected = 0
        self.chunks = 0
        self.model_mismatches = 0
        self.first_model_mismatch: tuple[int, str] | None = None
        self.effective = sampling_params(opts.params, None).to_dict()

    def reject(self, err: LineError) -> None:
        self.rejected += 1
        if len(self.rejects) < MAX_REPORTED_REJECTS:
            self.rejects.append(err)
        self.pending_rejects.append(
            {
                "job_id": self.job.id,
                "line_number": err.line_number,
                "reason": err.reason,
                "excerpt": err.excerpt,
            }
        )
        if len(self.pending_rejects) >= FLUSH_ROWS:
            self.flush(final=False)

    def add(self, p: ParsedRequest) -> None:
        self.batch.append(p)
        if len(self.batch) >= self.opts.chunk_size:
            self.full.append(self.batch)
            self.batch = []
            if len(self.full) * self.opts.chunk_size >= FLUSH_ROWS:
                self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        """Write the full chunks (and, when ``final``, the last partial one) and the rejects."""
        if final and self.batch:
            self.full.append(self.batch)
            self.batch = []
        if not self.full and not self.pending_rejects:
            return
        with self.db.session() as s:
            if self.full:
                self._write_chunks(s, self.full)
                self.full = []
            if self.pending_rejects:
                s.execute(insert_ignore_many(s, Reject, ["job_id", "line_number"]), self.pending_rejects)
                self.pending_rejects = []

    def _write_chunks(self, s: Session, groups: list[list[ParsedRequest]]) -> None:
        job_id = self.job.id
        chunk_rows: list[dict[str, Any]] = []
        request_groups: list[list[dict[str, Any]]] = []
        for group in groups:
            rows: list[dict[str, Any]] = []
            for p in group:
                try:
                    rows.append(_request_row(job_id, p, self.opts, self.effective))
                except ValueError as exc:
                    self.reject(LineError(p.line_number, str(exc), ""))
            if not rows:
                continue
            chunk_rows.append(
                {
                    "job_id": job_id,
                    "seq": self.chunks + len(chunk_rows),
                    "first_line": rows[0]["line_number"],
                    "last_line": rows[-1]["line_number"],
                    "requests_total": len(rows),
                    "status": ChunkStatus.PENDING.value,
                    "priority": self.opts.priority,
                    "attempts": 0,
                }
            )
            request_groups.append(rows)
        if not chunk_rows:
            return
        # Core tables: no ORM bookkeeping per row
        chunks, requests = cast(Table, Chunk.__table__), cast(Table, Request.__table__)
        ids = list(s.scalars(insert(chunks).returning(chunks.c.id, sort_by_parameter_order=True), chunk_rows))
        for chunk_id, rows in zip(ids, request_groups, strict=True):
            for row in rows:
                row["chunk_id"] = chunk_id
        bulk_insert_ignore(
            s, requests, [row for rows in request_groups for row in rows], ["job_id", "custom_id"]
        )
        # A line whose id was taken by an earlier line was ignored: find those chunks by count.
        counts = dict(
            s.execute(
                select(Request.chunk_id, func.count())
                .where(Request.chunk_id.in_(ids))
                .group_by(Request.chunk_id)
            ).all()
        )
        for chunk_id, rows in zip(ids, request_groups, strict=True):
            if counts.get(chunk_id, 0) != len(rows):
                rows[:] = self._drop_duplicates(s, chunk_id, rows)
        by_line = {p.line_number: p for group in groups for p in group}
        for rows in request_groups:
            for row in rows:
                p = by_line[row["line_number"]]
                if model_mismatch(p, self.job.model):
                    self.model_mismatches += 1
                    if self.first_model_mismatch is None:
                        self.first_model_mismatch = (p.line_number, p.model or "")
            self.accepted += len(rows)
        self.chunks += len(chunk_rows)

    def _drop_duplicates(self, s: Session, chunk_id: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Reject the chunk's rows that were not inserted (duplicate ids); fix up or remove the chunk."""
        present = set(s.scalars(select(Request.line_number).where(Request.chunk_id == chunk_id)))
        kept = [r for r in rows if r["line_number"] in present]
        for row in rows:
            if row["line_number"] not in present:
                self.reject(LineError(row["line_number"], f"duplicate id {row['custom_id']!r}", ""))
        if kept:
            s.execute(
                update(Chunk)
                .where(Chunk.id == chunk_id)
                .values(
                    requests_total=len(kept),
                    first_line=kept[0]["line_number"],
                    last_line=kept[-1]["line_number"],
                )
            )
        else:
            s.execute(delete(Chunk).where(Chunk.id == chunk_id))
        return kept


def _validate_strict(path: Path, opts: SubmitOptions) -> None:
    """--strict: one pass first, so a bad file is refused before anything is written."""
    bad: list[LineError] = []
    for item in read_requests(path, opts.task, max_line_bytes=opts.max_line_bytes):
        if isinstance(item, LineError):
            bad.append(item)
        else:
            try:
                render(item.task, item.input, opts.params)
            except ValueError as exc:
                bad.append(LineError(item.line_number, str(exc), ""))
            else:
                if model_mismatch(item, opts.model):
                    reason = f"the line asks for model {item.model!r:.200}, not the job's {opts.model!r}"
                    bad.append(LineError(item.line_number, reason, ""))
        if len(bad) >= 5:
            break
    if bad:
        first = bad[0]
        more = f" (and more: {', '.join(str(b.line_number) for b in bad[1:])})" if len(bad) > 1 else ""
        raise InputFileError(
            f"{path}: line {first.line_number}: {first.reason}{more}; --strict refuses the file"
        )


# (bytes of the file read, lines read, lines rejected so far)
ReadProgressFn = Callable[[int, int, int], None]
PROGRESS_EVERY = 2048  # lines between progress reports


def create_job(
    db: Database,
    path: Path,
    opts: SubmitOptions,
    *,
    source_sha256: str | None = None,
    on_progress: ReadProgressFn | None = None,
) -> SubmitReport:
    """Write the job and all its requests; the job is left ``submitting`` until the end."""
    path = Path(path)
    _check_options(path, opts)
    if opts.strict:
        _validate_strict(path, opts)
    sha = source_sha256 or sha256_file(path)
    with db.session() as s:
        job = Job(
            name=opts.name,
            task=opts.task,
            model=opts.model,
            queue=queue_for_model(opts.model),
            params_json=opts.params,
            template_version=TEMPLATE_VERSIONS[opts.task],
            input_format="native",
            status=JobStatus.SUBMITTING.value,
            priority=opts.priority,
            source_path=str(path),
            source_sha256=sha,
            start_at=opts.start_at,
            finish_by=opts.finish_by,
            submitted_by=_whoami(),
            schedule_id=opts.schedule_id,
        )
        s.add(job)
    writer = _Writer(db, job, opts)
    formats: set[str] = set()
    read = ReadProgress()
    for item in read_requests(path, opts.task, max_line_bytes=opts.max_line_bytes, progress=read):
        if isinstance(item, LineError):
            writer.reject(item)
        else:
            formats.add(item.input_format)
            writer.add(item)
        if on_progress is not None and read.lines % PROGRESS_EVERY == 0:
            on_progress(read.bytes_read, read.lines, writer.rejected)
    writer.flush(final=True)
    if on_progress is not None:
        on_progress(read.bytes_read, read.lines, writer.rejected)
    analyze_after_bulk_load(db, ["requests", "chunks", "rejects"])

    if writer.accepted == 0:
        discard_job(db, job.id)
        first = writer.rejects[0] if writer.rejects else None
        detail = f"; line {first.line_number}: {first.reason}" if first else ""
        raise InputFileError(f"{path}: no valid request in {writer.rejected} line(s){detail}")

    held = opts.start_at is not None and opts.start_at > utcnow()
    status = mark_ready(
        db,
        job.id,
        held=held,
        counts={
            "requests_total": writer.accepted,
            "lines_rejected": writer.rejected,
            "chunks_total": writer.chunks,
            "input_format": "openai"
            if formats == {"openai"}
            else ("mixed" if len(formats) > 1 else "native"),
        },
    )
    return SubmitReport(
        job_id=job.id,
        requests_total=writer.accepted,
        lines_rejected=writer.rejected,
        chunks_total=writer.chunks,
        status=status.value,
        rejects=writer.rejects,
        model=opts.model,
        model_mismatches=writer.model_mismatches,
        first_model_mismatch=writer.first_model_mismatch,
    )


def find_same_file(db: Database, sha256: str, task: str) -> list[int]:
    """Jobs already made from a file with the same content and task (a repeated submit)."""
    with db.session() as s:
        return list(
            s.scalars(
                select(Job.id).where(
                    Job.source_sha256 == sha256,
                    Job.task == task,
                    Job.status != JobStatus.SUBMITTING.value,
                )
            )
        )


def _whoami() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None
