"""Exports page through a job in two index lookups whose plan does not depend on the
planner's statistics, right after a bulk ingest; a large export keeps line order and count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analytics_data import write_jsonl
from sqlalchemy import text

from lmjobs.db.models import Result
from lmjobs.db.session import get_database
from lmjobs.jobs.export import iter_result_rows, requests_page, results_of
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.submit import SubmitOptions

N = 30_000


def _job(db_url: str, tmp_path: Path) -> int:
    rows = [{"id": f"r{i}", "text": f"t {i}"} for i in range(N)]
    db = get_database(db_url)
    job_id = create_job(db, write_jsonl(tmp_path / "in.jsonl", rows), SubmitOptions("summarize", "m")).job_id
    with db.session() as s:  # a result for every other request, in bulk, as workers would
        s.execute(
            text(
                "INSERT INTO results (job_id, request_id, status, output_text, finish_reason, input_tokens,"
                " output_tokens, latency_ms, model, dtype, device, params_json, template_version, worker,"
                " attempt, deduplicated, created_at) SELECT job_id, id, 'succeeded', 'out ' || custom_id,"
                " 'stop', 3, 2, 1.0, 'm', 'float32', 'cpu', '{}', 'summarize/v1', 'w', 1, false,"
                " CURRENT_TIMESTAMP FROM requests WHERE job_id = :j AND line_number % 2 = 0"
            ),
            {"j": job_id},
        )
    return job_id


@pytest.mark.postgres
def test_the_page_queries_use_indexes_right_after_a_bulk_ingest(postgres_url: str, tmp_path: Path) -> None:
    job_id = _job(postgres_url, tmp_path)  # no ANALYZE of results since its bulk insert
    db = get_database(postgres_url)
    with db.engine.connect() as conn:
        checks = [
            (requests_page(job_id, 100, 2000), "uq_requests_job_line"),
            (
                results_of(job_id, 1, 2000, [Result.status, Result.output_text]),
                "uq_results_job_request_sample",
            ),
        ]
        for stmt, index in checks:
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + sql)))
            assert f"Scan using {index} on" in plan, plan  # the key's own index, not a job-wide scan
            assert "Seq Scan" not in plan and "Bitmap" not in plan, plan


def test_a_large_export_keeps_line_order_and_count(db_url: str, tmp_path: Path) -> None:
    job_id = _job(db_url, tmp_path)
    lines = [r["line_number"] for r in iter_result_rows(get_database(db_url), job_id)]
    assert lines == list(range(1, N + 1))
    finished = [r for r in iter_result_rows(get_database(db_url), job_id, only_finished=True)]
    assert [r["line_number"] for r in finished] == list(range(2, N + 1, 2))
    assert all(r["output_text"] == f"out r{r['line_number'] - 1}" for r in finished[:100])
    assert json.dumps(finished[0], default=str)  # plain values, serializable
