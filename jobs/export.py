"""Export a job's results: JSONL, CSV, Parquet and the OpenAI Batch output format.

Rows are streamed from the database in pages, so a ten-million-row job exports in
bounded memory. Partial results of a running job export too: requests without a result
appear with status ``pending`` (``--only-finished`` leaves them out).

Every format but ``openai`` carries the same columns (``COLUMNS``), among them ``model``
(the model that ran) and ``requested_model`` (the model the line asked for, OpenAI's
``body.model``); the OpenAI format's ``body.model`` is the model that ran, as OpenAI's own
output names it. ``finished_at`` is the result's ``created_at`` (ISO 8601 UTC in
JSONL/CSV, a UTC timestamp in Parquet). In CSV an empty cell is NULL (the csv module cannot
tell the two apart); ``input_json`` is JSON text.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import and_, select

from lmjobs.db.models import Job, Request, Result, ResultStatus
from lmjobs.db.session import Database
from lmjobs.jobs.errors import OutputPathError

FORMATS = ("jsonl", "csv", "parquet", "openai")
PAGE = 2000
ROW_GROUP = 50_000  # Parquet rows per row group: big enough for readers, bounded memory

COLUMNS = [
    "job_id",
    "request_id",
    "line_number",
    "custom_id",
    "status",
    "output_text",
    "error",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "latency_ms",
    "model",
    "model_revision",
    "dtype",
    "template_version",
    "worker",
    "attempt",
    "deduplicated",
    "finished_at",
    "reference",
    "input_json",
    # Last, so positional readers of older exports keep working. The model the line asked for
    # (OpenAI body.model), beside ``model``, the one that actually ran it.
    "requested_model",
]

# The status an exported row shows for a request with no result yet.
NOT_FINISHED = "pending"


def rows_in_line_order(db: Database, job_id: int, *columns: Any, page: int = PAGE) -> Iterator[Any]:
    """``(line_number, *columns)`` for every request of the job, outer-joined with its
    result, in input order: a page at a time (keyset pagination on line_number), each page
    in its own short session, so a job of millions of lines never sits in memory."""
    last = 0
    while True:
        q = (
            select(Request.line_number, *columns)
            .outerjoin(Result, and_(Result.request_id == Request.id, Result.job_id == job_id))
            .where(Request.job_id == job_id, Request.line_number > last)
            .order_by(Request.line_number)
            .limit(page)
        )
        with db.session() as s:
            rows = s.execute(q).all()
        if not rows:
            return
        last = rows[-1][0]
        yield from rows


def iter_result_rows(db: Database, job_id: int, *, only_finished: bool = False) -> Iterator[dict[str, Any]]:
    """One dict per request in input order."""
    for _, req, res in rows_in_line_order(db, job_id, Request, Result):
        if res is None and only_finished:
            continue
        yield {
            "job_id": req.job_id,
            "request_id": req.id,
            "line_number": req.line_number,
            "custom_id": req.custom_id,
            "status": res.status if res else NOT_FINISHED,
            "output_text": res.output_text if res else None,
            "error": res.error if res else None,
            "finish_reason": res.finish_reason if res else None,
            "input_tokens": res.input_tokens if res else None,
            "output_tokens": res.output_tokens if res else None,
            "latency_ms": res.latency_ms if res else None,
            "model": res.model if res else None,
            "model_revision": res.model_revision if res else None,
            "dtype": res.dtype if res else None,
            "template_version": res.template_version if res else None,
            "worker": res.worker if res else None,
            "attempt": res.attempt if res else None,
            "deduplicated": res.deduplicated if res else None,
            "finished_at": res.created_at if res else None,
            "reference": req.reference,
            "input_json": req.input_json,
            "requested_model": req.requested_model,
        }


def open_output(path: Path | None, *, force: bool, binary: bool = False) -> IO[Any]:
    """Open the output file; refuse to overwrite an existing file unless ``force``.

    ``O_EXCL`` makes the check and the create one step, so a file that appears in
    between is not clobbered either; a directory or a symlink is never followed.
    """
    if path is None:
        raise ValueError("path is required")
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory")
    if path.is_symlink():
        raise OutputPathError(f"{path} is a symbolic link; refusing to write through it")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    flags |= getattr(os, "O_NOFOLLOW", 0)  # a symlink swapped in after the check is refused
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise OutputPathError(f"{path} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror}") from None
    return os.fdopen(
        fd,
        "wb" if binary else "w",
        encoding=None if binary else "utf-8",
        newline="" if not binary else None,
    )


def _openai_line(row: dict[str, Any], model: str) -> dict[str, Any]:
    if row["status"] == ResultStatus.SUCCEEDED.value:
        response = {
            "status_code": 200,
            "request_id": str(row["request_id"]),
            "body": {
                "id": f"chatcmpl-lmjobs-{row['request_id']}",
                "object": "chat.completion",
                "created": int(row["finished_at"].timestamp()) if row["finished_at"] else None,
                "model": row["model"] or model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": row["output_text"]},
                        "finish_reason": row["finish_reason"],
                    }
                ],
                "usage": {
                    "prompt_tokens": row["input_tokens"],
                    "completion_tokens": row["output_tokens"],
                    "total_tokens": (row["input_tokens"] or 0) + (row["output_tokens"] or 0),
                },
            },
        }
        return {
            "id": f"lmjobs-{row['request_id']}",
            "custom_id": row["custom_id"],
            "response": response,
            "error": None,
        }
    failed = row["status"] == ResultStatus.FAILED.value
    message = row["error"] if failed else "not finished yet"
    code = "generation_failed" if failed else NOT_FINISHED
    return {
        "id": f"lmjobs-{row['request_id']}",
        "custom_id": row["custom_id"],
        "response": None,
        "error": {"code": code, "message": message},
    }


def write_results(
    db: Database,
    job_id: int,
    fmt: str,
    out: IO[Any],
    *,
    only_finished: bool = False,
) -> int:
    """Write every row to ``out`` (text for jsonl/csv/openai, binary for parquet)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rows = iter_result_rows(db, job_id, only_finished=only_finished)
    n = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(_text_row(row), ensure_ascii=False) + "\n")
            n += 1
    elif fmt == "openai":
        with db.session() as s:
            job = s.get(Job, job_id)
            model = job.model if job else ""
        for row in rows:
            out.write(json.dumps(_openai_line(row, model), ensure_ascii=False) + "\n")
            n += 1
    elif fmt == "csv":
        w = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            text_json = json.dumps(row["input_json"], ensure_ascii=False)
            w.writerow({**_text_row(row), "input_json": text_json})
            n += 1
    else:
        n = _write_parquet(rows, out)
    return n


def _text_row(row: dict[str, Any]) -> dict[str, Any]:
    finished = row["finished_at"]
    if isinstance(finished, datetime):
        return {**row, "finished_at": finished.isoformat()}
    return row


def _write_parquet(rows: Iterator[dict[str, Any]], out: IO[bytes]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("job_id", pa.int64()),
            ("request_id", pa.int64()),
            ("line_number", pa.int64()),
            ("custom_id", pa.string()),
            ("status", pa.string()),
            ("output_text", pa.string()),
            ("error", pa.string()),
            ("finish_reason", pa.string()),
            ("input_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("latency_ms", pa.float64()),
            ("model", pa.string()),
            ("model_revision", pa.string()),
            ("dtype", pa.string()),
            ("template_version", pa.string()),
            ("worker", pa.string()),
            ("attempt", pa.int64()),
            ("deduplicated", pa.bool_()),
            ("finished_at", pa.timestamp("us", tz="UTC")),
            ("reference", pa.string()),
            ("input_json", pa.string()),
            ("requested_model", pa.string()),
        ]
    )
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append({**row, "input_json": json.dumps(row["input_json"], ensure_ascii=False)})
            if len(batch) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n += len(batch)
                batch = []
        if batch or n == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n
