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

import gc
import itertools
import operator
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Dialect, Select, Text, bindparam, cast, select

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


# What an export row holds, by name: (name, column). ``line_number`` and ``request_id`` come
# with every page; ``job_id`` is the job's own; a request with no result has its result
# columns None (``status`` ``pending``, ``sample_index`` 0).
_REQUEST_FIELDS = {
    "custom_id": Request.custom_id,
    "reference": Request.reference,
    "input_json": Request.input_json,
    "requested_model": Request.requested_model,
    "task": Request.task,  # the OpenAI format's body kind; not an export column
}
_RESULT_FIELDS = {
    "status": Result.status,
    "output_text": Result.output_text,
    "error": Result.error,
    "finish_reason": Result.finish_reason,
    "input_tokens": Result.input_tokens,
    "output_tokens": Result.output_tokens,
    "latency_ms": Result.latency_ms,
    "model": Result.model,
    "model_revision": Result.model_revision,
    "dtype": Result.dtype,
    "template_version": Result.template_version,
    "worker": Result.worker,
    "attempt": Result.attempt,
    "deduplicated": Result.deduplicated,
    "finished_at": Result.created_at,
    "sample_index": Result.sample_index,
    "valid": Result.valid,
    "logprobs": Result.logprobs_json,  # JSONL and OpenAI only: it can be large
}
_PENDING = {"status": NOT_FINISHED, "sample_index": 0}  # a request's row before its result
# Columns whose values repeat within a page (a chunk's results share one timestamp): each
# distinct value is converted once.
_REPEATING = frozenset({"finished_at"})
EXPORT_PAGE = 2000  # requests a page; each page is two statements on one pooled connection


class _Statement:
    """A Core statement compiled once for the connection's dialect and run on the DBAPI
    cursor: rows are the driver's own tuples, with no result object per row. Values are then
    converted a column at a time by the processors SQLAlchemy itself would apply (from the
    first answer's column types), so they are the values a Core query returns."""

    def __init__(self, stmt: Select[Any], dialect: Dialect, columns: Sequence[Any]) -> None:
        self.compiled = stmt.compile(dialect=dialect)
        self.sql = self.compiled.string
        self.dialect = dialect
        self.columns = columns
        self.processors: list[Any] | None = None

    def rows(self, cursor: Any, **params: Any) -> list[tuple[Any, ...]]:
        values = self.compiled.construct_params(params)
        order = self.compiled.positiontup
        cursor.execute(self.sql, [values[k] for k in order] if order is not None else values)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        if self.processors is None:
            self.processors = [
                c.type.dialect_impl(self.dialect).result_processor(self.dialect, d[1])
                for c, d in zip(self.columns, cursor.description, strict=True)
            ]
        return rows


def _convert(process: Any, column: Sequence[Any], repeating: bool) -> Sequence[Any]:
    """``process`` of each value; once per distinct value where a column repeats a few values
    over the page (a chunk's timestamp, the booleans, an absent ``logprobs``). A column's raw
    values are of one database type, so equal values are the same value (SQLite stores a
    BOOLEAN as 0/1, a REAL as a float)."""
    try:
        distinct = set(column)
    except TypeError:  # unhashable values (a driver that parsed JSON itself)
        return list(map(process, column))
    # -0.0 == 0.0 would share one value: floats are converted one by one
    if repeating or (len(distinct) * 4 <= len(column) and float not in set(map(type, distinct))):
        once = {v: process(v) for v in distinct}
        return list(map(once.__getitem__, column))
    return list(map(process, column))


def _column_pages(
    db: Database,
    job_id: int,
    fields: Sequence[str],
    *,
    only_finished: bool = False,
    json_text: bool = False,
) -> Iterator[dict[str, Sequence[Any]]]:
    """The job's export rows, a page at a time, as columns: ``{name: values}`` for
    ``job_id``, ``request_id``, ``line_number`` and each of ``fields``, one value per request
    and sample, in input order then sample order (:func:`rows_in_line_order` explains the
    two index lookups a page takes and why). ``only_finished`` leaves out the requests
    without a result.

    A page is fetched as plain tuples and turned into columns in C (``zip``); Python runs per
    row only where a page has a request without a result or with several samples.

    ``json_text``: ``input_json`` comes as the JSON text the database holds (what CSV and
    Parquet write), not parsed into objects and serialized again."""
    req_fields = [f for f in fields if f in _REQUEST_FIELDS]
    res_fields = [f for f in fields if f in _RESULT_FIELDS]
    chosen: dict[str, Any] = dict(_REQUEST_FIELDS)
    if json_text:
        chosen["input_json"] = cast(Request.input_json, Text)
    req_columns = [Request.id, Request.line_number, *(chosen[f] for f in req_fields)]
    res_columns = [Result.request_id, *(_RESULT_FIELDS[f] for f in res_fields)]
    dialect = db.engine.dialect
    requests = _Statement(
        select(*req_columns)
        .where(Request.job_id == bindparam("job"), Request.line_number > bindparam("after"))
        .order_by(Request.line_number)
        .limit(EXPORT_PAGE),
        dialect,
        req_columns,
    )
    results = _Statement(
        select(*res_columns)
        .where(
            Result.job_id == bindparam("job"),
            Result.request_id >= bindparam("first"),
            Result.request_id <= bindparam("last"),
        )
        .order_by(Result.request_id, Result.sample_index),
        dialect,
        res_columns,
    )
    pending = (None, *(_PENDING.get(f) for f in res_fields))
    last = 0
    while True:
        with db.engine.connect() as conn:  # one short transaction a page
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                reqs = requests.rows(cursor, job=job_id, after=last)
                if not reqs:
                    return
                ids = [r[0] for r in reqs]
                res = results.rows(cursor, job=job_id, first=min(ids), last=max(ids))
            finally:
                cursor.close()
        last = reqs[-1][1]
        req_cols = list(zip(*reqs, strict=True))
        if len(res) != len(reqs) or [r[0] for r in res] != ids:
            # some request has no result, or several samples: pair them up row by row
            by_request: dict[int, list[tuple[Any, ...]]] = {}
            for r in res:
                by_request.setdefault(r[0], []).append(r)
            pairs = []
            for q in reqs:
                got = by_request.get(q[0])
                if got is None:
                    if not only_finished:
                        pairs.append((q, pending))
                else:
                    pairs.extend((q, r) for r in got)
            if not pairs:
                continue
            req_cols = list(zip(*(q for q, _ in pairs), strict=True))
            res = [r for _, r in pairs]
        res_cols = list(zip(*res, strict=True))
        cols: dict[str, Sequence[Any]] = {
            "job_id": [job_id] * len(res),
            "request_id": req_cols[0],
            "line_number": req_cols[1],
        }
        named = [
            *zip(req_fields, req_cols[2:], (requests.processors or [])[2:], strict=True),
            *zip(res_fields, res_cols[1:], (results.processors or [])[1:], strict=True),
        ]
        for name, column, process in named:
            cols[name] = column if process is None else _convert(process, column, name in _REPEATING)
        yield cols


def _export_fields(*, with_task: bool = False, with_logprobs: bool = False) -> list[str]:
    """The keys of an export row, in order: ``COLUMNS``, then ``logprobs``, then ``task``."""
    return [*COLUMNS, *(["logprobs"] if with_logprobs else []), *(["task"] if with_task else [])]


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
    keys = _export_fields(with_task=with_task, with_logprobs=with_logprobs)
    for cols in _column_pages(db, job_id, keys[3:], only_finished=only_finished):
        yield from map(dict, map(zip, itertools.repeat(keys), zip(*(cols[k] for k in keys), strict=True)))


def iter_request_samples(
    db: Database, job_id: int, *, only_finished: bool = False, with_task: bool = False
) -> Iterator[list[dict[str, Any]]]:
    """Each request's rows (:func:`iter_result_rows`, with ``logprobs``) together, in input
    order: its samples in order, one row for a failed or pending request."""
    rows = iter_result_rows(db, job_id, only_finished=only_finished, with_task=with_task, with_logprobs=True)
    for _, samples in itertools.groupby(rows, key=operator.itemgetter("request_id")):
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
    rows = [tuple(r.get(k) for k in _OPENAI_FIELDS) for r in samples]
    return _body(rows, endpoint, model)


# What the OpenAI format reads of each row, in this order (``_openai_line``, ``_body``).
_OPENAI_FIELDS = (
    "request_id",
    "custom_id",
    "status",
    "error",
    "task",
    "model",
    "finished_at",
    "input_tokens",
    "sample_index",
    "output_text",
    "finish_reason",
    "logprobs",
    "output_tokens",
)
_SUCCEEDED = ResultStatus.SUCCEEDED.value
_FAILED = ResultStatus.FAILED.value


def _body(samples: Sequence[tuple[Any, ...]], endpoint: str, model: str) -> dict[str, Any]:
    """:func:`openai_body` of rows of ``_OPENAI_FIELDS``."""
    first = samples[0]
    rid, row_model, finished_at, prompt = first[0], first[5], first[6], first[7] or 0
    chat = endpoint == CHAT_ENDPOINT
    choices = []
    completion = 0
    for row in samples:
        index, text, finish, logprobs, output_tokens = row[8:]
        if finish != "stop" and finish != "length":
            finish = "stop"
        completion += output_tokens or 0
        if chat:
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text or ""},
                    "finish_reason": finish,
                    "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                }
            )
        else:
            choices.append(
                {
                    "index": index,
                    "text": text or "",
                    "finish_reason": finish,
                    "logprobs": None if logprobs is None else completion_logprobs(logprobs),
                }
            )
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-lmjobs-{rid}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(finished_at.timestamp()) if finished_at else 0,
        "model": row_model or model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _openai_line(samples: Sequence[tuple[Any, ...]], model: str) -> dict[str, Any]:
    """One request's line from its rows (``_OPENAI_FIELDS`` in order, one row per sample; a
    failed or pending request has one)."""
    rid, custom_id, status, error, task = samples[0][:5]
    if status == _SUCCEEDED:
        # generate lines (and OpenAI /v1/completions lines) continue a prompt: a text completion
        endpoint = COMPLETIONS_ENDPOINT if task == "generate" else CHAT_ENDPOINT
        return {
            "id": f"lmjobs-{rid}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": str(rid), "body": _body(samples, endpoint, model)},
            "error": None,
        }
    failed = status == _FAILED
    return {
        "id": f"lmjobs-{rid}",
        "custom_id": custom_id,
        "response": None,
        "error": {
            "code": "generation_failed" if failed else NOT_FINISHED,
            "message": error if failed else "not finished yet",
        },
    }


def _openai_lines(cols: dict[str, Sequence[Any]], model: str) -> list[dict[str, Any]]:
    rows = zip(*(cols[k] for k in _OPENAI_FIELDS), strict=True)
    if len(set(cols["request_id"])) == len(cols["request_id"]):  # one row a request: no grouping
        return [_openai_line((row,), model) for row in rows]
    return [
        _openai_line(list(group), model) for _, group in itertools.groupby(rows, key=operator.itemgetter(0))
    ]


# A succeeded request's line with one sample and no log-probabilities (``_openai_line``), as
# the text between its cells, for each endpoint: (text completion, chat completion). The cells
# are, in order: request id, custom_id, request id, request id, created, model, index, text,
# finish_reason, prompt tokens, completion tokens, total tokens.
_OPENAI_TEXTS = [
    (b'{"id":"lmjobs-', b'{"id":"lmjobs-'),
    (b'","custom_id":', b'","custom_id":'),
    (b',"response":{"status_code":200,"request_id":"', b',"response":{"status_code":200,"request_id":"'),
    (b'","body":{"id":"cmpl-lmjobs-', b'","body":{"id":"chatcmpl-lmjobs-'),
    (b'","object":"text_completion","created":', b'","object":"chat.completion","created":'),
    (b',"model":', b',"model":'),
    (b',"choices":[{"index":', b',"choices":[{"index":'),
    (b',"text":', b',"message":{"role":"assistant","content":'),
    (b',"finish_reason":', b'},"finish_reason":'),
    (b',"logprobs":null}],"usage":{"prompt_tokens":', b',"logprobs":null}],"usage":{"prompt_tokens":'),
    (b',"completion_tokens":', b',"completion_tokens":'),
    (b',"total_tokens":', b',"total_tokens":'),
    (b'}}},"error":null}\n', b'}}},"error":null}\n'),
]


def _openai_page(cols: dict[str, Sequence[Any]], model: str) -> tuple[bytes, int]:
    """A page's OpenAI lines and their count. Where each request has one row, the succeeded
    rows without log-probabilities (most lines) are built a column at a time: their cells
    (:func:`json_cells`) between the fixed texts of their endpoint's line, equal to
    ``orjson.dumps(_openai_line(...))``; every other line is built by ``_openai_line``."""
    rids = cols["request_id"]
    n = len(rids)
    if len(set(rids)) != n:  # some request has several samples: grouped, line by line
        grouped = _openai_lines(cols, model)
        return b"".join(map(_dumps_line, grouped)), len(grouped)
    slow = [
        i
        for i, (status, logprobs) in enumerate(zip(cols["status"], cols["logprobs"], strict=True))
        if status != _SUCCEEDED or logprobs is not None
    ]
    if len(slow) == n:
        return b"".join(map(_dumps_line, _openai_lines(cols, model))), n
    chat = [task != "generate" for task in cols["task"]]  # generate lines are text completions
    finished = {t: int(t.timestamp()) if t else 0 for t in set(cols["finished_at"])}
    models = {m: m or model for m in set(cols["model"])}
    finishes = {f: f if f == "stop" or f == "length" else "stop" for f in set(cols["finish_reason"])}
    prompt = [t or 0 for t in cols["input_tokens"]]
    completion = [t or 0 for t in cols["output_tokens"]]
    rid_cells = json_cells(rids)
    cells = [
        rid_cells,
        json_cells(cols["custom_id"]),
        rid_cells,
        rid_cells,
        json_cells(list(map(finished.__getitem__, cols["finished_at"]))),
        json_cells(list(map(models.__getitem__, cols["model"]))),
        json_cells(cols["sample_index"]),
        json_cells([t or "" for t in cols["output_text"]]),
        json_cells(list(map(finishes.__getitem__, cols["finish_reason"]))),
        json_cells(prompt),
        json_cells(completion),
        json_cells(list(map(operator.add, prompt, completion))),
    ]
    step = 2 * len(cells) + 1
    pieces: list[bytes] = [b""] * (n * step)
    texts = list(_OPENAI_TEXTS)
    for j, (column, before, after) in enumerate(cells):  # before and after join the texts
        texts[j] = (texts[j][0] + before, texts[j][1] + before)
        texts[j + 1] = (after + texts[j + 1][0], after + texts[j + 1][1])
        pieces[2 * j + 1 :: step] = column
    for j, pair in enumerate(texts):
        pieces[2 * j :: step] = list(map(pair.__getitem__, chat)) if pair[0] != pair[1] else [pair[0]] * n
    if not slow:
        return b"".join(pieces), n
    lines = [b"".join(pieces[i : i + step]) for i in range(0, len(pieces), step)]
    rows = list(zip(*(cols[k] for k in _OPENAI_FIELDS), strict=True))
    for i in slow:
        lines[i] = _dumps_line(_openai_line((rows[i],), model))
    return b"".join(lines), n


def write_results(
    db: Database,
    job_id: int,
    fmt: str,
    out: IO[Any],
    *,
    only_finished: bool = False,
) -> int:
    """Write every row to ``out`` (text for jsonl/csv/openai, binary for parquet), a page at a
    time, the page's rows built from its columns in C (``map``/``zip``). Each line is written as
    soon as it is serialized: holding a page of orjson's outputs to join them made a JSONL line
    three times as slow (8.5 against 2.8 us of CPU, 50,000 rows on SQLite)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with _fewer_collections():
        return _write(db, job_id, fmt, out, only_finished=only_finished)


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """The cyclic garbage collector's youngest generation is collected after 50,000 container
    allocations instead of 700 while an export runs. Export rows make no cycles (reference
    counting frees them), but each OpenAI line allocates about ten containers, and at the
    default threshold the collections took a third of that export's time (200,000 rows: 3.8 s
    of CPU at 700, 2.4 s at 50,000). Cycles made meanwhile are still collected."""
    threshold = gc.get_threshold()
    gc.set_threshold(50_000, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


def _write(db: Database, job_id: int, fmt: str, out: IO[Any], *, only_finished: bool) -> int:
    if fmt == "parquet":
        pages = _column_pages(db, job_id, COLUMNS[3:], only_finished=only_finished, json_text=True)
        return _write_parquet(pages, out)
    n = 0
    if fmt == "jsonl":  # orjson writes datetimes as ISO 8601 (with their UTC offset) itself
        keys = _export_fields(with_logprobs=True)
        pages = _column_pages(db, job_id, keys[3:], only_finished=only_finished, json_text=True)
        for cols in pages:
            cols["input_json"] = list(map(orjson.loads, cols["input_json"]))  # parsed in C
            out.write(json_object_lines(keys, [cols[k] for k in keys]).decode())
            n += len(cols["job_id"])
    elif fmt == "openai":
        with db.session() as s:
            job = s.get(Job, job_id)
            model = job.model if job else ""
        for cols in _column_pages(db, job_id, _OPENAI_FIELDS[1:], only_finished=only_finished):
            text, count = _openai_page(cols, model)
            out.write(text.decode())
            n += count
    else:
        out.write(csv_lines([[c] for c in COLUMNS]))
        for cols in _column_pages(db, job_id, COLUMNS[3:], only_finished=only_finished, json_text=True):
            cols["finished_at"] = _convert(_isoformat, cols["finished_at"], True)
            out.write(csv_lines([cols[k] for k in COLUMNS]))
            n += len(cols["job_id"])
    return n


# What makes csv.writer quote a cell (excel dialect, QUOTE_MINIMAL): the delimiter, the quote
# character, or a line break.
_CSV_SPECIAL = re.compile(r'[,"\r\n]')


def csv_cells(values: Sequence[Any]) -> list[str]:
    """One column's cells exactly as ``csv.writer`` (excel dialect) writes them: None empty,
    a string (a str subclass such as an enum member by its value) as is, anything else by
    ``str``; quoted, its quotes doubled, where it holds a comma, a quote or a line break.

    A column at a time: most of an export's columns repeat a few values over a page (the
    model, status, worker...), converted once each; a column that holds none of those
    characters anywhere costs one ``str`` per cell and one regex search over the page."""
    first = next((v for v in values if v is not None), None)
    # floats apart (-0.0 == 0.0 would share one cell), and columns whose first 256 values
    # are mostly distinct (ids, texts: hashing every one of them would be wasted)
    probe = values[:256]
    if not isinstance(first, float) and len(set(probe)) * 4 <= len(probe):
        distinct = set(values)
        if len(distinct) * 4 <= len(values):
            keys = list(distinct)
            once = dict(zip(keys, _cells(keys, first), strict=True))
            return list(map(once.__getitem__, values))
    return _cells(values, first)


def _cells(values: Sequence[Any], first: Any) -> list[str]:
    if None in values:
        values = ["" if v is None else v for v in values]
    cells = list(map(str.__str__, values)) if isinstance(first, str) else list(map(str, values))
    if _CSV_SPECIAL.search("".join(cells)) is None:
        return cells
    if all(map(_CSV_SPECIAL.search, cells)):  # JSON text: every cell is quoted
        return ['"' + c.replace('"', '""') + '"' for c in cells]
    found = list(map(_CSV_SPECIAL.search, cells))
    for i in itertools.compress(range(len(cells)), found):  # only the cells that need it
        cells[i] = '"' + cells[i].replace('"', '""') + '"'
    return cells


def csv_lines(columns: Sequence[Sequence[Any]]) -> str:
    """The CSV text of rows given as columns, with csv.writer's line ends (CRLF): the same
    text as ``csv.writer(out).writerows(zip(*columns))``, built a column at a time, about
    four times faster on export pages (the csv module quotes and copies cell by cell)."""
    if not columns or not columns[0]:
        return ""
    cells = list(map(csv_cells, columns))
    if len(cells) == 1:  # a row of one empty cell is written as "" (else it is a blank line)
        cells[0] = [c or '""' for c in cells[0]]
    # As JSONL (json_object_lines): a column of one cell over the page joins the text between
    # the varying cells; the page is one join of texts and cells laid out by slice assignment.
    n = len(cells[0])
    varying: list[list[str]] = []
    between: list[str] = []
    text = ""
    for j, column in enumerate(cells):
        text += "," if j else ""
        if column.count(column[0]) == n:
            text += column[0]
        else:
            between.append(text)
            varying.append(column)
            text = ""
    between.append(text + "\r\n")
    if not varying:
        return between[0] * n
    step = 2 * len(varying) + 1
    pieces: list[str] = [""] * (n * step)
    for j, column in enumerate(varying):
        pieces[2 * j :: step] = [between[j]] * n
        pieces[2 * j + 1 :: step] = column
    pieces[step - 1 :: step] = [between[-1]] * n
    return "".join(pieces)


def json_cells(values: Sequence[Any]) -> tuple[list[bytes], bytes, bytes]:
    """``orjson.dumps`` of each value, a column at a time: ``(cells, before, after)``, each
    value's text being ``before + cell + after``. The column is serialized as one array and
    cut at the separators between its values where their count shows that no value's text
    holds one: ``,`` (numbers, booleans, nulls, timestamps, strings without a comma) or ``},{``
    (objects: it cannot overlap itself, so the count is exact); a column of strings and nulls
    is cut by a regular expression that reads each JSON string whole (``","`` can overlap
    itself where a value ends in an escaped quote and a comma, so it is not counted). Only
    other columns (lists, mixed kinds) are serialized a value at a time.

    Why: ``list(map(orjson.dumps, values))`` cost about 10 us a value on a page of
    ``input_json`` objects (0.2 us when each output is dropped at once, 1 us when a copy is
    kept instead); one array for the column cut at its separators costs about 0.5 us."""
    n = len(values)
    if not n:
        return [], b"", b""
    text = orjson.dumps(values)
    if text.count(b",") == n - 1:
        return text[1:-1].split(b","), b"", b""
    kinds = set(map(type, values))
    if kinds == _DICT and text.count(b"},{") == n - 1:
        return text[2:-2].split(b"},{"), b"{", b"}"
    if kinds <= _STRINGS:
        return _JSON_STRING_OR_NULL.findall(text), b"", b""
    # a copy of each, so orjson's own (large) buffers are not the ones held
    return [bytes(memoryview(orjson.dumps(v))) for v in values], b"", b""


_DICT = {dict}
_STRINGS = frozenset({str, type(None)})
# A JSON string (its escapes read whole) or null: the values of an array of strings and nulls.
_JSON_STRING_OR_NULL = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|null')


def json_object_lines(keys: Sequence[str], columns: Sequence[Sequence[Any]]) -> bytes:
    """The JSONL text of rows given as columns: byte for byte
    ``orjson.dumps(dict(zip(keys, row)), option=OPT_APPEND_NEWLINE)`` for each row, built a
    column at a time (:func:`json_cells`). A column that holds one value over the page becomes
    part of the text between the varying cells; the page's text is then one join of those
    texts and cells, laid out row after row by slice assignments (no Python step per row)."""
    if not columns or not columns[0]:
        return b""
    n = len(columns[0])
    varying: list[list[bytes]] = []
    between: list[bytes] = []  # the constant text before each varying cell, and after the last
    text = b"{"
    for i, (key, column) in enumerate(zip(keys, columns, strict=True)):
        cells, before, after = json_cells(column)
        text += (b"," if i else b"") + orjson.dumps(key) + b":" + before
        if cells.count(cells[0]) == n:
            text += cells[0] + after
        else:
            between.append(text)
            varying.append(cells)
            text = after
    between.append(text + b"}\n")
    if not varying:
        return between[0] * n
    step = 2 * len(varying) + 1
    pieces: list[bytes] = [b""] * (n * step)
    for j, cells in enumerate(varying):
        pieces[2 * j :: step] = [between[j]] * n
        pieces[2 * j + 1 :: step] = cells
    pieces[step - 1 :: step] = [between[-1]] * n
    return b"".join(pieces)


def _dumps_line(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE)


def _isoformat(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


PARQUET_SCHEMA = [
    ("job_id", "int64"),
    ("request_id", "int64"),
    ("line_number", "int64"),
    ("custom_id", "string"),
    ("status", "string"),
    ("output_text", "string"),
    ("error", "string"),
    ("finish_reason", "string"),
    ("input_tokens", "int64"),
    ("output_tokens", "int64"),
    ("latency_ms", "float64"),
    ("model", "string"),
    ("model_revision", "string"),
    ("dtype", "string"),
    ("template_version", "string"),
    ("worker", "string"),
    ("attempt", "int64"),
    ("deduplicated", "bool"),
    ("finished_at", "timestamp[us, tz=UTC]"),
    ("reference", "string"),
    ("input_json", "string"),
    ("requested_model", "string"),
    ("sample_index", "int64"),
    ("valid", "bool"),
]


def _write_parquet(pages: Iterator[dict[str, Sequence[Any]]], out: IO[bytes]) -> int:
    """Row groups of ``ROW_GROUP`` rows, each built a column at a time (``pa.array`` of a
    column's values) from the pages' columns; at most one row group and one page are held."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            (name, pa.timestamp("us", tz="UTC") if kind.startswith("timestamp") else pa.type_for_alias(kind))
            for name, kind in PARQUET_SCHEMA
        ]
    )
    names = schema.names
    held: dict[str, list[Any]] = {c: [] for c in names}

    def group(size: int) -> pa.Table:
        arrays = []
        for field in schema:
            column = held[field.name]
            arrays.append(pa.array(column[:size], type=field.type))
            del column[:size]
        return pa.Table.from_arrays(arrays, schema=schema)

    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        for cols in pages:
            for c in names:
                held[c].extend(cols[c])
            while len(held["job_id"]) >= ROW_GROUP:
                writer.write_table(group(ROW_GROUP))
                n += ROW_GROUP
        rest = len(held["job_id"])
        if rest or n == 0:
            writer.write_table(group(rest))
            n += rest
    return n
