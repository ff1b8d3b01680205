"""The ingest's blocks and rows: files cut into ranges of whole lines that parsing processes
read themselves, and rows written as COPY text on PostgreSQL that store exactly what
SQLite's tuples store, special characters, duplicates and model mismatches included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from analytics_data import write_jsonl
from sqlalchemy import select

from lmjobs.db.models import Chunk, Reject, Request
from lmjobs.db.session import get_database
from lmjobs.jobs import ingest
from lmjobs.jobs.ingest import Preparer, create_job
from lmjobs.jobs.inputs import LineError, ReadProgress, line_ranges, read_raw_lines
from lmjobs.jobs.submit import SubmitOptions

LINES = [
    b'{"text": "one"}',
    b"",  # a blank line is a line
    b"x" * 300,  # longer than the pieces below
    b'{"text": "four"}\r',
    b"y" * 5000,  # longer than the line limit below
    b'{"text": "six"}',
]


def _read(path: Path, **kw: Any) -> list[tuple[int, bytes | str]]:
    items = read_raw_lines(path, 1000, ReadProgress(), **kw)
    return [(n, raw.reason if isinstance(raw, LineError) else raw) for n, raw in items]


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("size", [1, 7, 64, 301, 10_000])
def test_ranges_of_whole_lines_read_back_as_the_whole_file(
    tmp_path: Path, size: int, final_newline: bool
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(LINES) + (b"\n" if final_newline else b""))
    whole = _read(path)
    assert len(whole) == len(LINES) and "line too long" in str(whole[4][1])

    ranges = list(line_ranges(path, size))
    pieces: list[tuple[int, bytes | str]] = []
    first = 1
    for start, end, lines in ranges:
        got = _read(path, start=start, end=end, first_line=first)
        assert len(got) == lines
        pieces += got
        first += lines
    assert pieces == whole
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))


def test_an_empty_file_has_no_range(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert list(line_ranges(path, 64)) == []


SPECIAL = 'tab\there, newline\nthere, cr\rhere, back\\slash, \\N, quote" and 漢字 😀'
ROWS: list[Any] = [
    {"id": "plain", "text": "nothing special"},
    {"id": "a\tb", "text": SPECIAL, "reference": SPECIAL, "model": "other\\model"},
    {"id": "\\N", "text": "an id that reads as COPY's NULL", "temperature": 0.5, "stop": ["\n", "\t"]},
    {"id": "x\\ty", "text": "a backslash and a t, not a tab", "metadata": {"k\tey": ["v\\al", "\n"]}},
    {"id": "é😀", "text": "unicode id", "reference": "\\"},
]


def _stored(db_url: str, job_id: int) -> list[tuple[Any, ...]]:
    with get_database(db_url).session() as s:
        return [
            tuple(r)
            for r in s.execute(
                select(
                    Request.line_number,
                    Request.custom_id,
                    Request.task,
                    Request.input_json,
                    Request.params_json,
                    Request.reference,
                    Request.requested_model,
                    Request.content_sha256,
                    Request.isolated_attempts,
                )
                .where(Request.job_id == job_id)
                .order_by(Request.line_number)
            )
        ]


@pytest.mark.parametrize("processes", [0, 2])
def test_special_characters_are_stored_as_parsed_and_duplicates_named(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 256)  # many blocks
    monkeypatch.setattr(ingest, "FLUSH_ROWS", 8)  # many transactions: a twin in another one
    filler = [{"id": f"f{i}", "text": f"filler {i}"} for i in range(20)]
    twins = [{**r, "text": "a second line with this id"} for r in ROWS[1:]]
    path = write_jsonl(tmp_path / "in.jsonl", [*ROWS, *filler, *twins])

    rep = create_job(
        get_database(db_url),
        path,
        SubmitOptions(task="summarize", model="m", chunk_size=4, ingest_processes=processes),
    )

    # what the stored rows must be: the tuples SQLite's executemany writes, JSON as values
    expected = []
    for row in Preparer("summarize", {}, "m").read(path, 10**6, 0, path.stat().st_size, 1).rows:
        assert isinstance(row, tuple)
        n, cid, task, inp, params, ref, model, sha = row
        expected.append(
            (n, cid, task, orjson.loads(inp), params and orjson.loads(params), ref, model, sha, 0)
        )
    kept = len(ROWS) + len(filler)
    assert _stored(db_url, rep.job_id) == expected[:kept]
    assert (rep.requests_total, rep.lines_rejected) == (kept, len(twins))
    with get_database(db_url).session() as s:
        rejects = dict(
            s.execute(select(Reject.line_number, Reject.reason).where(Reject.job_id == rep.job_id)).all()
        )
        chunks = s.execute(
            select(Chunk.first_line, Chunk.last_line, Chunk.requests_total)
            .where(Chunk.job_id == rep.job_id)
            .order_by(Chunk.seq)
        ).all()
    assert rejects == {kept + 1 + i: f"duplicate id {r['id']!r}" for i, r in enumerate(twins)}
    assert sum(c.requests_total for c in chunks) == kept == rep.requests_total
    assert len(chunks) == rep.chunks_total
    assert chunks[-1].last_line == kept  # the chunk that held only twins is gone
    assert (rep.model_mismatches, rep.first_model_mismatch) == (1, (2, "other\\model"))


def test_a_model_mismatch_left_for_the_next_transaction_is_counted(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 150 rows, 100 a transaction, chunks of 64: the first transaction writes 128 rows and
    # leaves 22 for the last one, among them the line that asks for another model.
    rows: list[Any] = [{"id": f"r{i}", "text": f"text {i}"} for i in range(150)]
    rows[139]["model"] = "other"
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    monkeypatch.setattr(ingest, "FLUSH_ROWS", 100)
    rep = create_job(
        get_database(db_url), path, SubmitOptions(task="summarize", model="m", ingest_processes=0)
    )
    assert (rep.requests_total, rep.chunks_total) == (150, 3)
    assert (rep.model_mismatches, rep.first_model_mismatch) == (1, (140, "other"))


@pytest.mark.parametrize("copy", [False, True])
def test_prepared_hashes_equal_content_hash_with_and_without_line_params(copy: bool) -> None:
    """The job's params are normalized once for every line without its own; the hashes are
    the ones ``content_hash`` gives each line (what dedup and the cache key on)."""
    from lmjobs.jobs.params import sampling_params
    from lmjobs.jobs.templates import content_hash, render

    job_params = {"temperature": 1, "stop": "END", "max_new_tokens": 20}
    lines = [
        {"id": "a", "text": "first text"},
        {"id": "b", "text": "second text", "temperature": 0, "stop": ["x", "y"]},
        {"id": "c", "text": "first text", "max_new_tokens": 20},  # overrides to the same value
    ]
    block = [(i + 1, orjson.dumps(line)) for i, line in enumerate(lines)]
    prepared = Preparer("summarize", job_params, "m", copy_text=copy)(block)
    assert not prepared.rejects and prepared.numbers == [1, 2, 3]
    overrides = [None, {"temperature": 0, "stop": ["x", "y"]}, {"max_new_tokens": 20}]
    for row, line, own in zip(prepared.rows, lines, overrides, strict=True):
        expected = content_hash(
            "summarize",
            render("summarize", {"text": line["text"]}, job_params),
            sampling_params(job_params, own).to_dict(),
        )
        sha = row.split(b"\t")[7].decode() if copy else row[7]
        assert sha == expected
    first, _, third = (r.split(b"\t")[7] if copy else r[7] for r in prepared.rows)
    assert first == third  # an override equal to the job's value hashes the same
