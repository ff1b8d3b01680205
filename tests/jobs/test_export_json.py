"""JSONL built a column at a time (``json_cells``, ``json_object_lines``) is byte for byte what
orjson writes of each row as a dict: on random pages of every kind of value an export holds,
awkward strings, nulls, floats, timestamps and JSON values included, and on whole exports
(failed, pending and n-sample rows, log-probabilities, awkward text) against the row-dict
path."""

from __future__ import annotations

import enum
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from analytics_data import FAKE_CTX, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from sqlalchemy import select, update

from lmjobs.db.models import Chunk, Job, Request, Result, utcnow
from lmjobs.db.session import Database, get_database
from lmjobs.jobs import export
from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.lifecycle import start_due_jobs


class Status(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# Pieces that look like the separators json_cells cuts at, escapes, and text that is not ASCII.
PIECES = [
    *("a", ",", '","', "},{", '"', "\\", "\\,", "null", "\n", "\t", "\r", "\x00", "\x1f"),
    *("é", "日本", "\u2028", " ", "%s", "%", ""),
]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 5)))


def _when(rng: random.Random) -> datetime:
    base = datetime(2026, 12, 3, 16, 11, 26, tzinfo=timezone.utc)
    return base + timedelta(microseconds=rng.choice([0, 1, 123456, 10**6]))


KINDS = {
    "int": lambda rng: rng.randint(-(2**63), 2**63 - 1) if rng.random() < 0.3 else rng.randint(0, 3),
    "float": lambda rng: rng.choice([0.0, -0.0, 100.0, 1e16, 1e-7, 0.1 + 0.2, -1.5, 123456.789, 1e300]),
    "bool": lambda rng: rng.random() < 0.5,
    "text": _text,
    "enum": lambda rng: rng.choice(list(Status)),
    "time": _when,
    "object": lambda rng: {_text(rng): _text(rng), "n": rng.randint(0, 9)} if rng.random() < 0.8 else {},
    "list": lambda rng: [{"token": _text(rng), "logprob": -0.5, "top_logprobs": []}] * rng.randint(0, 2),
}


def _column(rng: random.Random, kind: str, rows: int) -> list[Any]:
    make = KINDS[kind]
    shape = rng.choice(["varied", "constant", "nulls", "all null", "few"])
    if shape == "constant":
        return [make(rng)] * rows
    if shape == "all null":
        return [None] * rows
    if shape == "few":
        pool = [make(rng) for _ in range(2)]
        return [rng.choice(pool) for _ in range(rows)]
    return [None if shape == "nulls" and rng.random() < 0.3 else make(rng) for _ in range(rows)]


def _reference(keys: list[str], columns: list[list[Any]]) -> bytes:
    rows = zip(*columns, strict=True)
    return b"".join(
        orjson.dumps(dict(zip(keys, row, strict=True)), option=orjson.OPT_APPEND_NEWLINE) for row in rows
    )


@pytest.mark.parametrize("seed", range(200))
def test_json_object_lines_equal_orjson_of_each_row(seed: int) -> None:
    rng = random.Random(seed)
    rows = rng.choice([1, 2, 3, 7, 40])
    kinds = [rng.choice(list(KINDS)) for _ in range(rng.randint(1, 8))]
    keys = [f"k{i}_{kind}" for i, kind in enumerate(kinds)]
    columns = [_column(rng, kind, rows) for kind in kinds]
    assert export.json_object_lines(keys, columns) == _reference(keys, columns)
    for column in columns:  # tuples (what a page's zip gives) as well as lists
        cells, before, after = export.json_cells(tuple(column))
        assert [before + c + after for c in cells] == [orjson.dumps(v) for v in column]


def test_json_cells_edge_columns() -> None:
    for column in (
        ['a","b', 'c","d'],  # the separator inside values: counted, so cut otherwise
        [{"x": "},{"}, {"y": 1}],
        [{}, {}, {"a": 1}],
        ["", ""],
        ["\\", "\\\\", '\\"'],
        [None, "null", "x,y"],
        [[1, 2], None, []],
        [1, True, 1.0, None],
    ):
        cells, before, after = export.json_cells(column)
        assert [before + c + after for c in cells] == [orjson.dumps(v) for v in column], column
    assert export.json_object_lines(["a"], [[]]) == b""
    assert export.json_object_lines(["a", "b"], [[1, 1], ["%s", "%s"]]) == _reference(
        ["a", "b"], [[1, 1], ["%s", "%s"]]
    )


def _awkward_job(db: Database, tmp_path: Path) -> int:
    """12 requests in 6 chunks of 2, 4 of them run; one fails; results given awkward text,
    floats, booleans, nulls and log-probabilities; pending rows between finished ones."""
    rows: list[Any] = translate_rows(12)
    rows[0]["text"] = 'quotes " commas , "," },{ and\nnewlines\ttabs ü 日本 \\ null'
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", rows), "translate", chunk_size=2)
    start_due_jobs(db, utcnow())
    with db.session() as s:
        chunks = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)))
    for i in (0, 1, 3, 5):
        process_chunk(db, chunks[i], generate=FakeEngine(), ctx=FAKE_CTX)
    with db.session() as s:
        ids = list(s.scalars(select(Result.id).where(Result.job_id == job_id).order_by(Result.request_id)))
        odd = {
            ids[0]: {"output_text": 'a "b", c\n\t日本 },{ "," \\ null %s', "latency_ms": -0.0, "valid": True},
            ids[1]: {
                "output_text": None,
                "status": "failed",
                "error": 'boom, "quoted"\n',
                "latency_ms": 1e16,
            },
            ids[2]: {"latency_ms": 1e-7, "valid": False, "model_revision": None, "deduplicated": True},
            ids[3]: {
                "logprobs_json": [{"token": ',"x', "logprob": -0.25, "bytes": [44], "top_logprobs": []}],
                "latency_ms": 0.1 + 0.2,
            },
        }
        for rid, values in odd.items():
            s.execute(update(Result).where(Result.id == rid).values(**values))
    return job_id


def _row_dicts(db: Database, job_id: int, only_finished: bool) -> bytes:
    """The JSONL text as the row-dict path writes it: orjson of each row's dict."""
    rows = export.iter_result_rows(db, job_id, only_finished=only_finished, with_logprobs=True)
    return b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows)


def _jsonl(db: Database, job_id: int, only_finished: bool) -> bytes:
    import io

    out = io.StringIO(newline="")
    export.write_results(db, job_id, "jsonl", out, only_finished=only_finished)
    return out.getvalue().encode()


def test_jsonl_export_equals_the_row_dicts(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = get_database(db_url)
    job_id = _awkward_job(db, tmp_path)
    for only_finished in (False, True):
        expected = _row_dicts(db, job_id, only_finished)
        assert expected.count(b"\n") == (8 if only_finished else 12)
        assert _jsonl(db, job_id, only_finished) == expected
        monkeypatch.setattr(export, "EXPORT_PAGE", 3)  # pages that mix pending and finished rows
        assert _jsonl(db, job_id, only_finished) == expected
        monkeypatch.undo()


def _openai_by_line(db: Database, job_id: int, only_finished: bool) -> bytes:
    """The OpenAI format as the line-by-line path writes it (``_openai_line`` for each line)."""
    with db.session() as s:
        model = s.get(Job, job_id).model  # type: ignore[union-attr]
    pages = export._column_pages(db, job_id, export._OPENAI_FIELDS[1:], only_finished=only_finished)
    return b"".join(export._dumps_line(line) for cols in pages for line in export._openai_lines(cols, model))


def _openai(db: Database, job_id: int, only_finished: bool) -> bytes:
    import io

    out = io.StringIO(newline="")
    export.write_results(db, job_id, "openai", out, only_finished=only_finished)
    return out.getvalue().encode()


def test_openai_export_equals_the_line_by_line_path(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Succeeded one-sample lines built a column at a time, among failed, pending, log-prob and
    awkward lines (odd finish reasons, no model, no token counts), on chat and completion
    endpoints, whole and in pages of 3 and 1."""
    db = get_database(db_url)
    job_id = _awkward_job(db, tmp_path)
    with db.session() as s:
        ids = list(s.scalars(select(Result.id).where(Result.job_id == job_id).order_by(Result.request_id)))
        s.execute(update(Result).where(Result.id == ids[4]).values(finish_reason="error", model=None))
        s.execute(
            update(Result).where(Result.id == ids[5]).values(finish_reason=None, model="", input_tokens=None)
        )
        s.execute(update(Result).where(Result.id == ids[6]).values(output_text=None, output_tokens=None))
        s.execute(
            update(Request)
            .where(Request.job_id == job_id, Request.line_number % 3 == 0)
            .values(task="generate")
        )
    for only_finished in (False, True):
        expected = _openai_by_line(db, job_id, only_finished)
        assert expected.count(b"\n") == (8 if only_finished else 12)
        assert b"text_completion" in expected and b"chat.completion" in expected
        for page in (2000, 3, 1):
            monkeypatch.setattr(export, "EXPORT_PAGE", page)
            assert _openai(db, job_id, only_finished) == expected, (only_finished, page)
