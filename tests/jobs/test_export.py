"""`lmjobs results`: every format read back with its own reader equals the database,
for a job that is still running (pending rows) and with --only-finished."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from analytics_data import FAKE_CTX, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from services import cli_env, run_cli
from sqlalchemy import select, text

from lmjobs.db.models import Chunk
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest
from lmjobs.jobs.errors import OutputPathError
from lmjobs.jobs.export import COLUMNS, FORMATS, open_output, write_results
from lmjobs.jobs.lifecycle import start_due_jobs


def _one_fails(requests: Sequence[GenRequest]) -> list[Generation]:
    out = FakeEngine()(requests)
    bad = out[0]
    out[0] = Generation(
        key=bad.key,
        text="",
        finish_reason=FinishReason.ERROR,
        input_tokens=0,
        output_tokens=0,
        latency_ms=0.0,
        error="CUDA out of memory",
    )
    return out


def _half_done_job(db: Database, tmp_path: Path) -> int:
    """10 requests in 4 chunks; 2 chunks run (6 results, one failed): the job is running."""
    rows: list[Any] = translate_rows(10)
    rows[1]["text"] = 'quotes " commas , and\nnewlines ü'
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", rows), "translate", chunk_size=3)
    from lmjobs.db.models import utcnow

    start_due_jobs(db, utcnow())
    with db.session() as s:
        chunks = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)))
    process_chunk(db, chunks[0], generate=_one_fails, ctx=FAKE_CTX)
    process_chunk(db, chunks[2], generate=FakeEngine(), ctx=FAKE_CTX)
    return job_id


def _truth(db: Database, job_id: int, only_finished: bool) -> list[tuple[int, str]]:
    """(request_id, status) from the job_results view, in input order."""
    sql = "SELECT request_id, status FROM job_results WHERE job_id = :j ORDER BY line_number"
    with db.session() as s:
        rows = [(int(r), str(st)) for r, st in s.execute(text(sql), {"j": job_id})]
    return [r for r in rows if not only_finished or r[1] != "pending"]


def read_back(fmt: str, data: bytes) -> list[tuple[int, str]]:
    """(request_id, status) of every row, read with the format's own reader."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        assert table.column_names == COLUMNS
        d = table.to_pydict()
        return list(zip(d["request_id"], d["status"], strict=True))
    textdata = data.decode("utf-8")
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(textdata, newline=""))
        assert reader.fieldnames == COLUMNS
        return [(int(r["request_id"]), r["status"]) for r in reader]
    lines = [json.loads(line) for line in textdata.splitlines()]
    if fmt == "jsonl":
        return [(r["request_id"], r["status"]) for r in lines]
    out = []
    for r in lines:  # OpenAI Batch output: status lives in response / error
        rid = int(r["id"].removeprefix("lmjobs-"))
        if r["response"] is not None:
            assert r["response"]["status_code"] == 200 and r["error"] is None
            out.append((rid, "succeeded"))
        else:
            code = r["error"]["code"]
            out.append((rid, "failed" if code == "generation_failed" else code))
    return out


def test_export_reads_back_equal_to_the_database(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _half_done_job(db, tmp_path)
    for fmt in FORMATS:
        for only_finished in (False, True):
            out = tmp_path / f"out-{only_finished}.{fmt}"
            with open_output(out, force=False, binary=fmt == "parquet") as fh:
                n = write_results(db, job_id, fmt, fh, only_finished=only_finished)
            truth = _truth(db, job_id, only_finished)
            assert read_back(fmt, out.read_bytes()) == truth, (fmt, only_finished)
            assert n == len(truth) == (6 if only_finished else 10)
            statuses = [st for _, st in truth]
            assert statuses.count("failed") == 1 and statuses.count("succeeded") == 5
            assert statuses.count("pending") == (0 if only_finished else 4)


def test_values_survive_each_format(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = _half_done_job(db, tmp_path)
    rows = {}
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"v.{fmt}"
        with open_output(out, force=False, binary=fmt == "parquet") as fh:
            write_results(db, job_id, fmt, fh)
        if fmt == "parquet":
            rows[fmt] = pq.read_table(out).to_pylist()
        elif fmt == "csv":
            rows[fmt] = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
        else:
            rows[fmt] = [json.loads(line) for line in out.read_text().splitlines()]
    j, c, p = rows["jsonl"][1], rows["csv"][1], rows["parquet"][1]
    assert j["input_json"]["text"] == 'quotes " commas , and\nnewlines ü'
    assert json.loads(c["input_json"]) == j["input_json"] == json.loads(p["input_json"])
    assert j["output_text"] and j["output_text"] == c["output_text"] == p["output_text"]
    assert j["finished_at"] == c["finished_at"] == p["finished_at"].isoformat()
    assert rows["jsonl"][0]["error"] == "CUDA out of memory" == rows["csv"][0]["error"]
    # Line 4 is in a chunk that has not run: pending, with no output (CSV: empty cell).
    assert rows["jsonl"][3]["status"] == rows["csv"][3]["status"] == "pending"
    assert rows["jsonl"][3]["output_text"] is None is rows["parquet"][3]["finished_at"]
    assert rows["csv"][3]["output_text"] == ""


def test_open_output_refuses_to_clobber(tmp_path: Path) -> None:
    existing = tmp_path / "x.jsonl"
    existing.write_text("keep me")
    with pytest.raises(OutputPathError, match="--force"):
        open_output(existing, force=False)
    (tmp_path / "link").symlink_to(existing)
    with pytest.raises(OutputPathError, match="symbolic link"):
        open_output(tmp_path / "link", force=True)
    assert existing.read_text() == "keep me"


def test_results_command(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _half_done_job(db, tmp_path)
    env = cli_env(LMJOBS_DATABASE_URL=db_url)
    for fmt in ("parquet", "csv"):  # to a file
        out = tmp_path / f"cli.{fmt}"
        proc = run_cli(["results", str(job_id), "--format", fmt, "-o", str(out)], env, check=True)
        assert "wrote 10 rows" in proc.stderr
        assert read_back(fmt, out.read_bytes()) == _truth(db, job_id, False)
    for fmt in ("jsonl", "openai"):  # to stdout, only finished
        proc = run_cli(["results", str(job_id), "-f", fmt, "--only-finished"], env, check=True)
        assert read_back(fmt, proc.stdout.encode()) == _truth(db, job_id, True)
    again = run_cli(["results", str(job_id), "--format", "csv", "-o", str(out)], env)
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_openai_format_answers_each_line_as_its_endpoint_would(db_url: str, tmp_path: Path) -> None:
    """Chat lines get a ``chat.completion``, completion lines a ``text_completion``: each body
    validates with the openai client's own type."""
    from analytics_data import run
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    db = get_database(db_url)
    lines = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}},
        {"custom_id": "g1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "once upon a time"}},
    ]  # fmt: skip
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", lines), "chat", model="m")
    run(db, job_id)
    out = io.StringIO()
    assert write_results(db, job_id, "openai", out) == 2
    by_id = {row["custom_id"]: row for row in map(json.loads, out.getvalue().splitlines())}
    chat = ChatCompletion.model_validate(by_id["c1"]["response"]["body"])
    completion = Completion.model_validate(by_id["g1"]["response"]["body"])
    assert chat.object == "chat.completion" and chat.choices[0].message.content
    assert completion.object == "text_completion" and completion.choices[0].text
