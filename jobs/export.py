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

A request asked for ``n`` samples has ``n`` rows (``sample_index`` 0..n-1, in line order then
sample order; a request still pending has one, sample 0); ``valid`` says whether a
constrained answer is complete under its format. JSONL also carries ``logprobs`` (the stored
``logprobs_json``: OpenAI's ``content`` list, null when not asked for). The OpenAI format
has one line per request whose ``choices`` hold every sample (``index`` = ``sample_index``),
each with its ``logprobs`` in the shape of its endpoint.
"""

from __future__ import annotations

import csv
import itertools
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Select, select

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
    # Then the sample (0..n-1) and whether a constrained answer is complete under its format.
    "sample_index",
    "valid",
]

# The status an exported row shows for a request with no result yet.
NOT_FINISHED = "pending"


def requests_page(job_id: int, after_line: int, page: int, columns: Sequence[Any] = ()) -> Select[Any]:
    """The next ``page`` requests of the job after ``after_line``: ``(id, line_number, *columns)``."""
    return (
        select(Request.id, Request.line_number, *columns)
        .where(Request.job_id == job_id, Request.line_number > after_line)
        .order_by(Request.line_number)
        .limit(page)
    )


def results_of(
    job_id: int, first_id: int, last_id: int, columns: Sequence[Any] = (), *, samples: bool = False
) -> Select[Any]:
    """The results of the job's requests with ids in ``[first_id, last_id]``: ``(request_id,
    *columns)``; only sample 0 (one row per request: its status) unless ``samples``. A range
    on ``(job_id, request_id)`` rather than an ``IN`` list: with stale statistics PostgreSQL
    answered ``request_id IN (...)`` with a bitmap scan over the whole job (0.46 s a page at a
    million rows); the range keeps the unique index (0.03 s)."""
    stmt = select(Result.request_id, *columns).where(
        Result.job_id == job_id, Result.request_id >= first_id, Result.request_id <= last_id
    )
    return stmt if samples else stmt.where(Result.sample_index == 0)


def rows_in_line_order(
    db: Database, job_id: int, *columns: Any, page: int = PAGE, samples: bool = False
) -> Iterator[tuple[Any, ...]]:
    """``(line_number, *columns)`` for every request of the job, in input order, with the
    columns of ``Result`` None where a request has no result yet. The columns of ``Result``
    are those of its sample 0 (the request's status), or with ``samples`` one tuple per
    sample, in sample order (fetched with the page, by the same key range).

    A page at a time, each in its own short session, so a job of millions of lines never
    sits in memory, and in two index lookups whose plan does not hinge on the planner's
    statistics (PITFALLS.md, SQL at scale): the next ``page`` requests by ``(job_id,
    line_number)``, then those requests' results by a range of ``(job_id, request_id)``. A join here
    became a hash join over the whole job when statistics were stale."""
    kinds = ["result" if getattr(c, "class_", None) is Result else "request" for c in columns]
    req_cols = [c for c, k in zip(columns, kinds, strict=True) if k == "request"]
    res_cols = [c for c, k in zip(columns, kinds, strict=True) if k == "result"]
    # Each output tuple is gathered in C from (line_number, *request columns, *result columns).
    where = iter(range(1, 1 + len(req_cols))), iter(range(1 + len(req_cols), 1 + len(columns)))
    gather = operator.itemgetter(0, *(next(where[k == "result"]) for k in kinds))
    empty = [(None,) * len(res_cols)]
    last = 0
    while True:
        with db.session() as s:
            conn = s.connection()  # Core rows: no ORM loading step per row
            requests = conn.execute(requests_page(job_id, last, page, req_cols)).all()
            if not requests:
                return
            results: dict[int, list[tuple[Any, ...]]] = {}
            if res_cols:
                # a job's ids grow with its lines: the range of the page's ids is tight
                ids = [r[0] for r in requests]
                stmt = results_of(job_id, min(ids), max(ids), res_cols, samples=samples)
                stmt = stmt.order_by(Result.request_id, Result.sample_index)
                for r in conn.execute(stmt):
                    results.setdefault(r[0], []).append(tuple(r[1:]))
        for req in requests:
            head = (req[1], *req[2:])
            for res in results.get(req[0], empty):
                yield gather(head + res)
        last = requests[-1][1]


# What an export row holds, in the order of its keys: (key, column). line_number comes from
# the page itself; a request with no result has result_id None.
_EXPORT_COLUMNS = [
    ("job_id", Request.job_id),
    ("request_id", Request.id),
    ("custom_id", Request.custom_id),
    ("status", Result.status),
    ("output_text", Result.output_text),
    ("error", Result.error),
    ("finish_reason", Result.finish_reason),
    ("input_tokens", Result.input_tokens),
    ("output_tokens", Result.output_tokens),
    ("latency_ms", Result.latency_ms),
    ("model", Result.model),
    ("model_revision", Result.model_revision),
    ("dtype", Result.dtype),
    ("template_version", Result.template_version),
    ("worker", Result.worker),
    ("attempt", Result.attempt),
    ("deduplicated", Result.deduplicated),
    ("finished_at", Result.created_at),
    ("reference", Request.reference),
    ("input_json", Request.input_json),
    ("requested_model", Request.requested_model),
    ("sample_index", Result.sample_index),
    ("valid", Result.valid),
    ("task", Request.task),  # kept for the OpenAI format's body kind; not an export column
    ("result_id", Result.id),
]
_LOGPROBS = ("logprobs", Result.logprobs_json)  # JSONL and OpenAI only: it can be large


def iter_result_rows(
    db: Database,
    job_id: int,
    *,
    only_finished: bool = False,
    with_task: bool = False,
    with_logprobs: bool = False,
) -> Iterator[dict[str, Any]]:
    """One dict per request and sample in input order, then sample order (plain columns: no
    ORM objects per row); ``with_task`` adds the request's ``task`` (what the OpenAI format
    needs), ``with_logprobs`` the stored ``logprobs`` (OpenAI's ``content`` list, or None)."""
    columns = [*_EXPORT_COLUMNS[:-2], *([_LOGPROBS] if with_logprobs else []), *_EXPORT_COLUMNS[-2:]]
    keys = [k for k, _ in columns[2:-2]]
    for line_number, *values in rows_in_line_order(db, job_id, *(c for _, c in columns), samples=True):
        if values[-1] is None and only_finished:
            continue
        row = {"job_id": values[0], "request_id": values[1], "line_number": line_number}
        row.update(zip(keys, values[2:-2], strict=True))
        if with_task:
            row["task"] = values[-2]
        if values[-1] is None:
            row["status"] = NOT_FINISHED
            row["sample_index"] = 0
        yield row


def iter_request_samples(
    db: Database, job_id: int, *, only_finished: bool = False, with_task: bool = False
) -> Iterator[list[dict[str, Any]]]:
    """Each request's rows (:func:`iter_result_rows`, with ``logprobs``) together, in input
    order: its samples in order, one row for a failed or pending request."""
    rows = iter_result_rows(db, job_id, only_finished=only_finished, with_task=with_task, with_logprobs=True)
    for _, samples in itertools.groupby(rows, key=lambda r: r["request_id"]):
        yield list(samples)


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


CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


def _usage(samples: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The prompt once (its samples share it), the completion tokens of every sample."""
    prompt = samples[0]["input_tokens"] or 0
    completion = sum(r["output_tokens"] or 0 for r in samples)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A chat choice's ``logprobs``: the stored list is OpenAI's ``content`` already."""
    return None if content is None else {"content": content, "refusal": None}


def completion_logprobs(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A text completion choice's (legacy) ``logprobs``: parallel lists of the tokens, their
    log-probabilities, each position's alternatives as ``{token: logprob}`` (the most likely
    of tokens that decode alike), and each token's character offset in the choice's text."""
    if content is None:
        return None
    offsets, at = [], 0
    for t in content:
        offsets.append(at)
        at += len(t["token"])
    tops = []
    for t in content:
        top: dict[str, float] = {}
        for c in t.get("top_logprobs") or ():
            top.setdefault(c["token"], c["logprob"])
        tops.append(top)
    return {
        "tokens": [t["token"] for t in content],
        "token_logprobs": [t["logprob"] for t in content],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def openai_body(samples: Sequence[dict[str, Any]], endpoint: str, model: str) -> dict[str, Any]:
    """What OpenAI's endpoint answers for a succeeded request, from its sample rows (in
    order; ``logprobs`` as :func:`iter_request_samples` gives it): a ``chat.completion`` for
    ``/v1/chat/completions``, a ``text_completion`` for ``/v1/completions``; one choice per
    sample, ``usage.completion_tokens`` summed over them."""
    first = samples[0]
    created = int(first["finished_at"].timestamp()) if first["finished_at"] else 0
    chat = endpoint == CHAT_ENDPOINT
    choices = []
    for row in samples:
        finish = row["finish_reason"] if row["finish_reason"] in ("stop", "length") else "stop"
        logprobs = row.get("logprobs")
        if chat:
            choices.append(
                {
                    "index": row["sample_index"],
                    "message": {"role": "assistant", "content": row["output_text"] or ""},
                    "finish_reason": finish,
                    "logprobs": chat_logprobs(logprobs),
                }
            )
        else:
            choices.append(
                {
                    "index": row["sample_index"],
                    "text": row["output_text"] or "",
                    "finish_reason": finish,
                    "logprobs": completion_logprobs(logprobs),
                }
            )
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-lmjobs-{first['request_id']}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": first["model"] or model,
        "choices": choices,
        "usage": _usage(samples),
    }


def _openai_line(samples: list[dict[str, Any]], model: str) -> dict[str, Any]:
    row = samples[0]  # a failed or pending request has this one row
    if row["status"] == ResultStatus.SUCCEEDED.value:
        # generate lines (and OpenAI /v1/completions lines) continue a prompt: a text completion
        endpoint = COMPLETIONS_ENDPOINT if row["task"] == "generate" else CHAT_ENDPOINT
        return {
            "id": f"lmjobs-{row['request_id']}",
            "custom_id": row["custom_id"],
            "response": {
                "status_code": 200,
                "request_id": str(row["request_id"]),
                "body": openai_body(samples, endpoint, model),
            },
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
    rows = iter_result_rows(db, job_id, only_finished=only_finished, with_logprobs=fmt == "jsonl")
    n = 0
    write = out.write
    if fmt == "jsonl":  # orjson writes datetimes as ISO 8601 (with their UTC offset) itself
        for row in rows:
            write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE).decode())
            n += 1
    elif fmt == "openai":
        with db.session() as s:
            job = s.get(Job, job_id)
            model = job.model if job else ""
        for samples in iter_request_samples(db, job_id, only_finished=only_finished, with_task=True):
            write(orjson.dumps(_openai_line(samples, model), option=orjson.OPT_APPEND_NEWLINE).decode())
            n += 1
    elif fmt == "csv":
        w = csv.writer(out)
        w.writerow(COLUMNS)
        cells = operator.itemgetter(*COLUMNS)
        for row in rows:
            row["input_json"] = orjson.dumps(row["input_json"]).decode()
            if row["finished_at"] is not None:
                row["finished_at"] = row["finished_at"].isoformat()
            w.writerow(cells(row))
            n += 1
    else:
        n = _write_parquet(rows, out)
    return n


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
            ("sample_index", pa.int64()),
            ("valid", pa.bool_()),
        ]
    )
    names = schema.names

    def group(batch: list[dict[str, Any]]) -> pa.Table:  # columns built once per row group
        return pa.Table.from_pydict({c: [r[c] for r in batch] for c in names}, schema=schema)

    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            row["input_json"] = orjson.dumps(row["input_json"]).decode()
            batch.append(row)
            if len(batch) >= ROW_GROUP:
                writer.write_table(group(batch))
                n += len(batch)
                batch = []
        if batch or n == 0:
            writer.write_table(group(batch))
            n += len(batch)
    return n
