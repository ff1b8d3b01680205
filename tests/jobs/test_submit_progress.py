"""Submit reports its progress (bytes of the file, lines, rejects) to whoever renders it,
and writes many chunks per transaction while keeping chunks, order and counts exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analytics_data import write_jsonl
from pydantic import ValidationError
from services import cli_env, run_cli
from sqlalchemy import func, select

from lmjobs.db.models import Chunk, Request
from lmjobs.db.session import get_database
from lmjobs.jobs import ingest
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.settings import Settings
from lmjobs.jobs.submit import SubmitOptions, make_options


@pytest.mark.parametrize("processes", [0, 2])  # parsed here, or by two forked processes
def test_progress_reaches_the_end_of_the_file_with_the_reject_count(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 2048)
    monkeypatch.setattr(ingest, "FLUSH_ROWS", 256)  # several transactions in this small file
    rows: list[object] = [{"id": f"r{i}", "text": f"text number {i}"} for i in range(1000)]
    rows[10] = "{not json"
    rows[500] = {"id": "r3", "text": "a duplicate id"}
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    calls: list[tuple[int, int, int]] = []
    db = get_database(db_url)

    rep = create_job(
        db,
        path,
        SubmitOptions(task="summarize", model="m", chunk_size=64, ingest_processes=processes),
        on_progress=lambda b, n, r: calls.append((b, n, r)),
    )

    assert calls[-1] == (path.stat().st_size, 1000, 2)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and len(calls) >= 10
    assert (rep.requests_total, rep.lines_rejected) == (998, 2)
    with db.session() as s:
        chunks = s.execute(
            select(Chunk.seq, Chunk.first_line, Chunk.last_line, Chunk.requests_total)
            .where(Chunk.job_id == rep.job_id)
            .order_by(Chunk.seq)
        ).all()
        per_chunk = dict(
            s.execute(
                select(Request.chunk_id, func.count())
                .where(Request.job_id == rep.job_id)
                .group_by(Request.chunk_id)
            ).all()
        )
    assert rep.chunks_total == len(chunks) == 16
    assert sum(c.requests_total for c in chunks) == 998 == sum(per_chunk.values())
    assert all(
        a.last_line < b.first_line for a, b in zip(chunks[:-1], chunks[1:], strict=True)
    )  # line order kept


def test_submit_draws_no_progress_on_a_pipe(lmjobs_home: Path, tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(50)))
    env = cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_BROKER_URL="redis://127.0.0.1:1/0")
    proc = run_cli(["submit", str(f), "--task", "summarize", "--json"], env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "submitting" not in proc.stderr and "lines/s" not in proc.stderr
    assert json.loads(proc.stdout)["requests"] == 50


def test_parsing_processes_follow_the_file_size_and_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ingest.ingest_processes(1000) == 0  # a small file is parsed where it is submitted
    assert ingest.ingest_processes(1000, 3) == 3
    monkeypatch.setenv("LMJOBS_INGEST_PROCESSES", "2")
    assert make_options(Settings(), task="summarize", model="m", params={}).ingest_processes == 2
    monkeypatch.setenv("LMJOBS_INGEST_PROCESSES", "many")
    with pytest.raises(ValidationError, match="ingest_processes"):
        Settings()
