"""Submit: stream an input file into a job, its requests, its rejects and its chunks.

The file is cut into blocks of whole lines; each block's lines are read, parsed and turned
into rows by a parsing process (or here, for a small file), a bounded number of blocks
ahead, and the rows are written in chunk-sized batches, so memory does not grow with the
file. On PostgreSQL the rows arrive as COPY text that this process streams as it is. The
job stays ``submitting`` until the last request is written:
an interrupted submit never looks complete, and ``jobs/cleanup.py`` removes it.
Duplicate ids are found by the database's unique key (insert-or-ignore, then a count per
chunk tells which chunks lost lines), so no set of ids is kept in memory.
"""

from __future__ import annotations

import getpass
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lmjobs.db.models import Chunk, ChunkStatus, Job, JobStatus, Reject, Request, utcnow
from lmjobs.db.session import Database, analyze_after_bulk_load, json_text
from lmjobs.db.upsert import (
    COPY_NULL,
    bulk_insert_rows,
    copy_field,
    copy_insert,
    copy_json,
    copy_text,
    insert_ignore_many,
    insert_new_rows,
    relax_commit,
)
from lmjobs.jobs.errors import InputFileError, UnknownJobError, UsageError
from lmjobs.jobs.inputs import (
    TASKS,
    LineError,
    ParsedRequest,
    ReadProgress,
    line_ranges,
    parse_line,
    read_raw_lines,
    read_requests,
    sha256_file,
)
from lmjobs.jobs.lifecycle import discard_job, mark_ready
from lmjobs.jobs.params import sampling_params
from lmjobs.jobs.queues import queue_for_model
from lmjobs.jobs.templates import TEMPLATE_VERSIONS, normalize_params, normalized_hash, render

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


# Requests written per transaction: few commits (each is an fsync on SQLite), bounded memory.
FLUSH_ROWS = 4096
# Bytes of the file per block (whole lines, ~1,700 of 300 bytes): the unit of work handed to
# a parsing process, which reads those lines itself.
BLOCK_BYTES = 512 << 10
# Blocks handed to the parsing processes ahead of the writer, per process: enough that they
# keep parsing while the writer waits for the database (a few MB; bounded whatever the file).
BLOCKS_AHEAD = 4
# Files smaller than this are parsed in the submitting process (starting helpers costs more).
PARALLEL_MIN_BYTES = 8 << 20

# A request row as the writer inserts it (JSON columns already serialized):
# (line_number, custom_id, task, input_json, params_json, reference, requested_model, content_sha256)
RequestRow = tuple[int, str, str, str, str | None, str | None, str | None, str]
# On PostgreSQL the same fields, and isolated_attempts, as one row of COPY text (bytes, no
# newline): the writer puts "job_id TAB chunk_id TAB" before it and streams it as it is.
REQUEST_COLUMNS = (
    "job_id",
    "chunk_id",
    "line_number",
    "custom_id",
    "task",
    "input_json",
    "params_json",
    "reference",
    "requested_model",
    "content_sha256",
    "isolated_attempts",
)
CHUNK_COLUMNS = (
    "job_id",
    "seq",
    "first_line",
    "last_line",
    "requests_total",
    "status",
    "priority",
    "attempts",
)


@dataclass
class PreparedBlock:
    """One block of lines, parsed, validated, rendered and hashed: what the writer stores."""

    rows: list[RequestRow] | list[bytes] = field(default_factory=list)  # bytes: COPY text
    numbers: list[int] = field(default_factory=list)  # the line number of each row
    rejects: list[LineError] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)
    mismatches: dict[int, str] = field(default_factory=dict)  # line -> the model it asked for
    bytes_read: int = 0  # progress of the reader at the end of this block
    lines: int = 0


class Preparer:
    """Turns raw lines into request rows: the per-line work of a submit (parse and check the
    line, render the task template, hash what the engine will see, serialize the JSON
    columns). Pure and picklable, so parsing processes run it on blocks of lines.
    ``copy_text``: rows as PostgreSQL COPY text, so the writer sends them without touching
    each one; else tuples (SQLite's executemany)."""

    def __init__(self, task: str, params: dict[str, Any], job_model: str, *, copy_text: bool = False) -> None:
        self.task, self.params, self.job_model = task, params, job_model
        self.copy_text = copy_text
        # the hash's params for every line without its own, normalized once
        self.normalized = normalize_params(sampling_params(params, None).to_dict())

    def read(self, path: Path, max_line_bytes: int, start: int, end: int, first_line: int) -> PreparedBlock:
        """The block of the file's lines from byte ``start`` to ``end`` (``line_ranges``)."""
        lines = read_raw_lines(
            path, max_line_bytes, ReadProgress(), start=start, end=end, first_line=first_line
        )
        return self(lines)

    def __call__(self, block: Iterable[tuple[int, bytes | LineError]]) -> PreparedBlock:
        out = PreparedBlock()
        for line_number, raw in block:
            p = raw if isinstance(raw, LineError) else parse_line(raw, line_number, self.task)
            if isinstance(p, LineError):
                out.rejects.append(p)
                continue
            try:
                rendered = render(p.task, p.input, self.params)
                own = normalize_params(sampling_params(self.params, p.params).to_dict()) if p.params else None
            except ValueError as exc:  # the task template or the params refuse the fields
                out.rejects.append(LineError(line_number, str(exc), ""))
                continue
            sha = normalized_hash(p.task, rendered, self.normalized if own is None else own)
            if self.copy_text:
                cast(list[bytes], out.rows).append(
                    b"\t".join(
                        (
                            b"%d" % line_number,
                            copy_text(p.custom_id),
                            copy_text(p.task),
                            copy_json(p.input),
                            COPY_NULL if p.params is None else copy_json(p.params),
                            COPY_NULL if p.reference is None else copy_text(p.reference),
                            COPY_NULL if p.model is None else copy_text(p.model),
                            sha.encode(),
                            b"0",  # isolated_attempts
                        )
                    )
                )
            else:
                cast(list[RequestRow], out.rows).append(
                    (
                        line_number,
                        p.custom_id,
                        p.task,
                        json_text(p.input),
                        None if p.params is None else json_text(p.params),
                        p.reference,
                        p.model,
                        sha,
                    )
                )
            out.numbers.append(line_number)
            out.formats.add(p.input_format)
            if model_mismatch(p, self.job_model):
                out.mismatches[line_number] = p.model or ""
        return out


def ingest_processes(size: int, requested: int | None = None) -> int:
    """Parsing processes for a file of ``size`` bytes: ``requested`` when given
    (``LMJOBS_INGEST_PROCESSES``; 0 = parse in the submitting process); else none for small
    files or one core, and one per core otherwise (the submitting process mostly waits on the
    database meanwhile)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if size < PARALLEL_MIN_BYTES or cores < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    return cores


# A parsing process's preparer, file and line limit (set once when it starts)
_worker: tuple[Preparer, Path, int] | None = None


def _init_worker(preparer: Preparer, path: Path, max_line_bytes: int) -> None:
    global _worker
    _worker = (preparer, path, max_line_bytes)


def _prepare_in_worker(start: int, end: int, first_line: int) -> PreparedBlock:
    assert _worker is not None
    preparer, path, max_line_bytes = _worker
    return preparer.read(path, max_line_bytes, start, end, first_line)


def prepared_blocks(
    path: Path, preparer: Preparer, max_line_bytes: int, processes: int
) -> Iterator[PreparedBlock]:
    """The file's lines as PreparedBlocks, in order. With ``processes``, blocks are read and
    prepared by that many forked processes, at most a few blocks ahead of the consumer, so
    memory stays bounded whatever the file's size; this process only finds where blocks
    start (``line_ranges``: newlines counted in C), and touches no line."""

    def blocks() -> Iterator[tuple[tuple[int, int, int], int, int]]:
        lines = 0
        for start, end, n in line_ranges(path, BLOCK_BYTES):
            yield (start, end, lines + 1), end, lines + n
            lines += n

    def stamped(prepared: PreparedBlock, bytes_read: int, lines: int) -> PreparedBlock:
        prepared.bytes_read, prepared.lines = bytes_read, lines
        return prepared

    if processes <= 0:
        for block, bytes_read, lines in blocks():
            yield stamped(preparer.read(path, max_line_bytes, *block), bytes_read, lines)
        return
    # fork: the children inherit the loaded code (no re-import) and touch no connection
    init = (preparer, path, max_line_bytes)
    with multiprocessing.get_context("fork").Pool(processes, _init_worker, init) as pool:
        window: deque[tuple[AsyncResult[PreparedBlock], int, int]] = deque()
        for block, bytes_read, lines in blocks():
            window.append((pool.apply_async(_prepare_in_worker, block), bytes_read, lines))
            if len(window) >= BLOCKS_AHEAD * processes:
                result, b, n = window.popleft()
                yield stamped(result.get(), b, n)
        while window:
            result, b, n = window.popleft()
            yield stamped(result.get(), b, n)


class _Writer:
    """Groups prepared rows into chunks and writes many chunks per transaction, each table
    with one cached statement executed with many rows (no SQL compiled per batch); on
    PostgreSQL the requests go as COPY text that the parsing already built."""

    def __init__(self, db: Database, job: Job, opts: SubmitOptions) -> None:
        self.db, self.job, self.opts = db, job, opts
        self.rows: list[Any] = []  # accepted rows not yet written: RequestRow, or bytes (COPY text)
        self.numbers: list[int] = []  # the line number of each of them
        self.mismatches: dict[int, str] = {}  # of the rows not yet written
        self.rejects: list[LineError] = []
        self.pending_rejects: list[dict[str, Any]] = []
        self.accepted = 0
        self.rejected = 0
        self.chunks = 0  # chunks written (and kept)
        self.seq = 0  # the next chunk's seq
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

    def add(self, block: PreparedBlock) -> None:
        for err in block.rejects:
            self.reject(err)
        self.rows.extend(block.rows)
        self.numbers.extend(block.numbers)
        self.mismatches.update(block.mismatches)
        if len(self.rows) >= FLUSH_ROWS or len(self.pending_rejects) >= FLUSH_ROWS:
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        """Write the full chunks (and, when ``final``, the last partial one) and the rejects."""
        size = self.opts.chunk_size
        cut = len(self.rows) if final else len(self.rows) - len(self.rows) % size
        if cut == 0 and not self.pending_rejects:
            return
        try:
            with self.db.session() as s:
                # The job stays `submitting` until mark_ready's durable commit, which makes this
                # one durable too; a crash before it leaves a submit that cleanup removes.
                relax_commit(s)
                self._hold_job(s)
                if cut:
                    self._write_chunks(s, [(i, min(i + size, cut)) for i in range(0, cut, size)])
                    del self.rows[:cut]
                    del self.numbers[:cut]
                if self.pending_rejects:
                    s.execute(insert_ignore_many(s, Reject, ["job_id", "line_number"]), self.pending_rejects)
                    self.pending_rejects = []
        except IntegrityError as exc:  # SQLite: the job's foreign keys, when the job was deleted
            if job_exists(self.db, self.job.id):
                raise
            raise job_deleted(self.job.id) from exc

    def _hold_job(self, s: Session) -> None:
        """PostgreSQL: take the job's row ``FOR KEY SHARE`` until this transaction ends (what
        a foreign key's check of each row took: ``requests.job_id`` has triggers instead), so
        the job cannot be deleted under the rows written here; it fails if the job is gone.
        SQLite keeps the foreign keys, and its writer holds the whole database."""
        if self.db.is_sqlite:
            return
        held = s.execute(
            select(Job.id).where(Job.id == self.job.id).with_for_update(read=True, key_share=True)
        ).first()
        if held is None:
            raise job_deleted(self.job.id)

    def _write_chunks(self, s: Session, bounds: list[tuple[int, int]]) -> None:
        """Write ``self.rows[a:b]`` as one chunk for each (a, b) of ``bounds``."""
        job_id, numbers = self.job.id, self.numbers
        pending, priority = ChunkStatus.PENDING.value, self.opts.priority
        chunk_rows = [
            (job_id, self.seq + i, numbers[a], numbers[b - 1], b - a, pending, priority, 0)
            for i, (a, b) in enumerate(bounds)
        ]
        copy_rows = isinstance(self.rows[0], bytes)  # PostgreSQL
        if copy_rows:
            ids = insert_new_rows(s, "chunks", CHUNK_COLUMNS, chunk_rows)
        else:  # Core table: no ORM bookkeeping per row
            chunks = cast(Table, Chunk.__table__)
            stmt = insert(chunks).returning(chunks.c.id, sort_by_parameter_order=True)
            ids = list(s.scalars(stmt, [dict(zip(CHUNK_COLUMNS, row, strict=True)) for row in chunk_rows]))
        total = bounds[-1][1]
        if copy_rows:
            payload = []
            for chunk_id, (a, b) in zip(ids, bounds, strict=True):
                head = b"%d\t%d\t" % (job_id, chunk_id)  # one join per chunk, no loop per row
                payload.append(head + (b"\n" + head).join(self.rows[a:b]) + b"\n")
            inserted = copy_insert(s, "requests", REQUEST_COLUMNS, payload, total, ["job_id", "custom_id"])
        else:
            rows_out = [
                (job_id, chunk_id, *row, 0)
                for chunk_id, (a, b) in zip(ids, bounds, strict=True)
                for row in self.rows[a:b]
            ]
            inserted = bulk_insert_rows(s, "requests", REQUEST_COLUMNS, rows_out, ["job_id", "custom_id"])
        # A line whose id was taken by an earlier line was ignored: find those chunks by count
        # (a chunk whose every line was ignored has no row in the count).
        counts: dict[int | None, int] | None = None
        if inserted != total:
            counts = dict(
                s.execute(
                    select(Request.chunk_id, func.count())
                    .where(Request.chunk_id.in_(ids))
                    .group_by(Request.chunk_id)
                ).all()
            )
        for chunk_id, (a, b) in zip(ids, bounds, strict=True):
            kept = numbers[a:b]
            if counts is not None and counts.get(chunk_id, 0) != b - a:
                kept = self._drop_duplicates(s, chunk_id, a, b)
            self.accepted += len(kept)
            if self.mismatches:
                for line in kept:
                    model = self.mismatches.pop(line, None)
                    if model is not None:
                        self.model_mismatches += 1
                        if self.first_model_mismatch is None:
                            self.first_model_mismatch = (line, model)
        self.chunks += len(chunk_rows)
        self.seq += len(chunk_rows)
        # rows dropped as duplicates leave theirs behind; the rows not written yet keep theirs
        last = numbers[total - 1]
        for line in [n for n in self.mismatches if n <= last]:
            del self.mismatches[line]

    def _drop_duplicates(self, s: Session, chunk_id: int, a: int, b: int) -> list[int]:
        """Reject the chunk's rows (``self.rows[a:b]``) that were not inserted (duplicate
        ids); fix up or remove the chunk. Returns the line numbers kept."""
        present = set(s.scalars(select(Request.line_number).where(Request.chunk_id == chunk_id)))
        kept = [n for n in self.numbers[a:b] if n in present]
        for n, row in zip(self.numbers[a:b], self.rows[a:b], strict=True):
            if n not in present:
                custom_id = copy_field(row, 1) if isinstance(row, bytes) else row[1]
                self.reject(LineError(n, f"duplicate id {custom_id!r}", ""))
        if kept:
            s.execute(
                update(Chunk)
                .where(Chunk.id == chunk_id)
                .values(requests_total=len(kept), first_line=kept[0], last_line=kept[-1])
            )
        else:  # its seq stays unused: seq orders chunks, and a gap means nothing
            s.execute(delete(Chunk).where(Chunk.id == chunk_id))
            self.chunks -= 1
        return kept


def job_exists(db: Database, job_id: int) -> bool:
    with db.session() as s:
        return s.scalar(select(Job.id).where(Job.id == job_id)) is not None


def job_deleted(job_id: int) -> UnknownJobError:
    """The job of a submit in progress was deleted (``lmjobs cleanup`` or a submit of the
    same file took it for an abandoned one, or someone deleted it by hand): its rows went
    with it."""
    return UnknownJobError(
        f"job {job_id} was deleted while its file was being submitted (by `lmjobs cleanup`, "
        "another submit of the same file or by hand); none of its rows are left: submit the file again"
    )


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


# (bytes of the file read, lines read, lines rejected so far); called once per block of lines
ReadProgressFn = Callable[[int, int, int], None]


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
    preparer = Preparer(opts.task, opts.params, opts.model, copy_text=not db.is_sqlite)
    processes = ingest_processes(path.stat().st_size, opts.ingest_processes)
    bytes_read = lines = 0
    for block in prepared_blocks(path, preparer, opts.max_line_bytes, processes):
        writer.add(block)
        formats |= block.formats
        bytes_read, lines = block.bytes_read, block.lines
        if on_progress is not None:
            on_progress(bytes_read, lines, writer.rejected)
    writer.flush(final=True)
    if on_progress is not None:
        on_progress(bytes_read, lines, writer.rejected)
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
    if status is None:
        raise job_deleted(job.id)
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
