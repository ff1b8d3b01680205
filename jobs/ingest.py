"""Submit: stream an input file into a job, its requests, its rejects and its chunks.

The file is read once, line by line, and written in chunk-sized batches, so memory does
not grow with the file. The job stays ``submitting`` until the last request is written:
an interrupted submit never looks complete, and ``jobs/cleanup.py`` removes it.
Duplicate ids are found by the database's unique key (insert-or-ignore, then the
returned rows tell which lines were new), so no set of ids is kept in memory.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lmjobs.db.models import Chunk, ChunkStatus, Job, JobStatus, Reject, Request, utcnow
from lmjobs.db.session import Database
from lmjobs.db.upsert import insert_ignore_many
from lmjobs.jobs.errors import InputFileError, UsageError
from lmjobs.jobs.inputs import TASKS, LineError, ParsedRequest, read_requests, sha256_file
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


def _request_row(job_id: int, chunk_id: int, p: ParsedRequest, opts: SubmitOptions) -> dict[str, Any]:
    """Raises ValueError when the task template refuses the fields (e.g. no target language)."""
    rendered = render(p.task, p.input, opts.params)
    effective = sampling_params(opts.params, p.params).to_dict()
    return {
        "job_id": job_id,
        "chunk_id": chunk_id,
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


def _insert_requests(session: Session, rows: list[dict[str, Any]]) -> set[int]:
    """Insert-or-ignore on (job, caller's id); returns the line numbers actually inserted."""
    dialect = session.get_bind().dialect.name
    ins = (postgresql if dialect == "postgresql" else sqlite).insert(Request).values(rows)
    stmt = ins.on_conflict_do_nothing(index_elements=["job_id", "custom_id"]).returning(Request.line_number)
    return set(session.scalars(stmt).all())


class _Writer:
    """Buffers parsed lines into chunks and writes each chunk in one statement."""

    def __init__(self, db: Database, job: Job, opts: SubmitOptions) -> None:
        self.db, self.job, self.opts = db, job, opts
        self.batch: list[ParsedRequest] = []
        self.rejects: list[LineError] = []
        self.pending_rejects: list[dict[str, Any]] = []
        self.accepted = 0
        self.rejected = 0
        self.chunks = 0
        self.model_mismatches = 0
        self.first_model_mismatch: tuple[int, str] | None = None

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

    def add(self, p: ParsedRequest) -> None:
        self.batch.append(p)
        if len(self.batch) >= self.opts.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self.batch and not self.pending_rejects:
            return
        with self.db.session() as s:
            if self.batch:
                self._write_chunk(s)
            if self.pending_rejects:
                s.execute(insert_ignore_many(s, Reject, ["job_id", "line_number"]), self.pending_rejects)
                self.pending_rejects = []
        self.batch = []

    def _write_chunk(self, s: Session) -> None:
        chunk = Chunk(
            job_id=self.job.id,
            seq=self.chunks,
            first_line=self.batch[0].line_number,
            last_line=self.batch[-1].line_number,
            requests_total=0,
            status=ChunkStatus.PENDING.value,
            priority=self.opts.priority,
        )
        s.add(chunk)
        s.flush()
        rows: list[dict[str, Any]] = []
        for p in self.batch:
            try:
                rows.append(_request_row(self.job.id, chunk.id, p, self.opts))
            except ValueError as exc:
                self.reject(LineError(p.line_number, str(exc), ""))
        inserted = _insert_requests(s, rows) if rows else set()
        for row in rows:
            if row["line_number"] not in inserted:
                self.reject(LineError(row["line_number"], f"duplicate id {row['custom_id']!r}", ""))
        if not inserted:
            s.delete(chunk)
            return
        for p in self.batch:
            if p.line_number in inserted and model_mismatch(p, self.job.model):
                self.model_mismatches += 1
                if self.first_model_mismatch is None:
                    self.first_model_mismatch = (p.line_number, p.model or "")
        chunk.requests_total = len(inserted)
        chunk.first_line, chunk.last_line = min(inserted), max(inserted)
        self.accepted += len(inserted)
        self.chunks += 1


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


def create_job(
    db: Database, path: Path, opts: SubmitOptions, *, source_sha256: str | None = None
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
    for item in read_requests(path, opts.task, max_line_bytes=opts.max_line_bytes):
        if isinstance(item, LineError):
            writer.reject(item)
            if len(writer.pending_rejects) >= 1000:
                writer.flush()
        else:
            formats.add(item.input_format)
            writer.add(item)
    writer.flush()

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
