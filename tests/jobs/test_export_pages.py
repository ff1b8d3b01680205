"""Exports built a page of columns at a time: the page size and the Parquet row group size do
not change a byte of any format, each row keeps its own timestamp, the garbage collector's
setting comes back, and the ingest benchmark times the formats it is asked for."""

from __future__ import annotations

import csv
import gc
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from analytics_data import FAKE_CTX, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from sqlalchemy import select, update

from lmjobs.bench import ingest as bench_ingest
from lmjobs.db.models import Chunk, Result, utcnow
from lmjobs.db.session import Database, get_database
from lmjobs.jobs import export
from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.lifecycle import start_due_jobs


def _job_with_gaps(db: Database, tmp_path: Path) -> int:
    """11 requests in 6 chunks of 2; chunks 0, 1, 3 and 5 ran: pending rows sit between
    finished ones, so pages of 3 mix requests with and without a result."""
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", translate_rows(11)), "translate", chunk_size=2)
    start_due_jobs(db, utcnow())
    with db.session() as s:
        chunks = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)))
    for i in (0, 1, 3, 5):
        process_chunk(db, chunks[i], generate=FakeEngine(), ctx=FAKE_CTX)
    return job_id


def _export_all(db: Database, job_id: int, only_finished: bool) -> dict[str, bytes]:
    out = {}
    for fmt in export.FORMATS:
        buf: io.BytesIO | io.StringIO = io.BytesIO() if fmt == "parquet" else io.StringIO(newline="")
        export.write_results(db, job_id, fmt, buf, only_finished=only_finished)
        value = buf.getvalue()
        out[fmt] = value if isinstance(value, bytes) else value.encode()
    return out


def test_page_and_row_group_sizes_change_no_byte(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = get_database(db_url)
    job_id = _job_with_gaps(db, tmp_path)
    for only_finished in (False, True):
        whole = _export_all(db, job_id, only_finished)  # one page, one row group
        monkeypatch.setattr(export, "EXPORT_PAGE", 3)
        monkeypatch.setattr(export, "ROW_GROUP", 4)
        paged = _export_all(db, job_id, only_finished)
        monkeypatch.undo()
        rows = [json.loads(line) for line in paged["jsonl"].splitlines()]
        assert len(rows) == (7 if only_finished else 11)
        assert [r["line_number"] for r in rows] == sorted(r["line_number"] for r in rows)
        meta = pq.ParquetFile(io.BytesIO(paged["parquet"])).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert sizes == ([4, 3] if only_finished else [4, 4, 3])
        assert pq.read_table(io.BytesIO(paged["parquet"])) == pq.read_table(io.BytesIO(whole["parquet"]))
        for fmt in ("jsonl", "csv", "openai"):
            assert paged[fmt] == whole[fmt], (fmt, only_finished)


def test_each_row_keeps_its_own_finished_at(db_url: str, tmp_path: Path) -> None:
    """A page's timestamps are converted once per distinct value: rows that share one and
    rows that do not each get their own back, in every format."""
    db = get_database(db_url)
    job_id = _job_with_gaps(db, tmp_path)
    base = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with db.session() as s:
        ids = list(s.scalars(select(Result.id).where(Result.job_id == job_id).order_by(Result.request_id)))
        for i, rid in enumerate(ids):  # pairs share a time; the first has no microseconds
            when = base + timedelta(seconds=i // 2, microseconds=(i // 2) * 1001)
            s.execute(update(Result).where(Result.id == rid).values(created_at=when))
    expected = [
        (base + timedelta(seconds=i // 2, microseconds=(i // 2) * 1001)).isoformat() for i in range(len(ids))
    ]
    assert expected[0] == "2026-01-02T03:04:05+00:00"
    out = _export_all(db, job_id, only_finished=True)
    jsonl = [json.loads(line)["finished_at"] for line in out["jsonl"].splitlines()]
    csv_rows = list(csv.DictReader(io.StringIO(out["csv"].decode(), newline="")))
    parquet = pq.read_table(io.BytesIO(out["parquet"])).column("finished_at").to_pylist()
    assert jsonl == expected
    assert [r["finished_at"] for r in csv_rows] == expected
    assert [t.isoformat() for t in parquet] == expected


def test_the_collector_setting_comes_back_after_an_export_that_fails(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = _job_with_gaps(db, tmp_path)
    before = gc.get_threshold()
    closed = io.StringIO()
    closed.close()
    with pytest.raises(ValueError, match="closed file"):
        export.write_results(db, job_id, "jsonl", closed)
    assert gc.get_threshold() == before
    export.write_results(db, job_id, "openai", io.StringIO())
    assert gc.get_threshold() == before


def test_ingest_bench_times_only_the_formats_asked(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    args = ["--lines", "40", "--formats", "csv,openai", "--broker", redis_url, "--json-out", str(out)]
    assert bench_ingest.main(args) == 0
    steps = json.loads(out.read_text())["runs"][0]["steps"]
    assert list(steps) == ["submit", "status", "export csv", "export openai"]
    assert all(st["seconds"] > 0 for st in steps.values())


@pytest.mark.parametrize("value", ["xml", "csv,xml", ","])
def test_ingest_bench_refuses_an_unknown_format(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_ingest.main(["--formats", value])
    assert exc.value.code == 2
    assert "--formats: choose among jsonl, csv, parquet, openai" in capsys.readouterr().err
