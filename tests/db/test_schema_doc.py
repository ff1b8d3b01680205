"""docs/schema.md is generated from the models and never drifts; its example queries run
unchanged on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from analytics_data import run, submit, submit_and_run, translate_rows, write_jsonl
from fake_engine import FakeEngine
from sqlalchemy import text

from lmjobs.db import schema_doc
from lmjobs.db.example_queries import EXAMPLES
from lmjobs.db.models import Base
from lmjobs.db.readonly import run_readonly_query
from lmjobs.db.session import get_database
from lmjobs.jobs.engine_api import FinishReason, Generation

SCHEMA_MD = Path(__file__).resolve().parents[2] / "docs" / "schema.md"


def test_schema_md_is_up_to_date() -> None:
    assert SCHEMA_MD.is_file(), "run: python -m lmjobs.db.schema_doc --write"
    assert SCHEMA_MD.read_text(encoding="utf-8") == schema_doc.render(), (
        "docs/schema.md drifted from db/models.py; run: python -m lmjobs.db.schema_doc --write"
    )


def test_every_table_and_column_is_documented() -> None:
    page = schema_doc.render()
    for table in Base.metadata.tables.values():
        section = page.split(f"\n## {table.name}\n", 1)[1].split("\n## ", 1)[0]
        for col in table.columns:
            assert f"| `{col.name}` |" in section, f"{table.name}.{col.name}"
        for ix in table.indexes:
            assert f"`{ix.name}`" in section
    assert "## job_results (view)" in page and "CREATE VIEW job_results" in page


def test_check_flag_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "schema.md"
    stale.write_text(schema_doc.render().replace("Primary key.", "Primary key!"))
    assert schema_doc.main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert schema_doc.main(["--write", str(stale)]) == 0
    assert schema_doc.main(["--check", str(stale)]) == 0


def _failing_first(requests):  # type: ignore[no-untyped-def]
    out = FakeEngine()(requests)
    g = out[0]
    out[0] = Generation(
        key=g.key,
        text="",
        finish_reason=FinishReason.ERROR,
        input_tokens=0,
        output_tokens=0,
        latency_ms=0.0,
        error="prompt too long",
    )
    return out


def test_view_columns_in_the_doc_are_the_database_view(db_url: str) -> None:
    db = get_database(db_url)
    with db.engine.connect() as conn:
        cols = list(conn.execute(text("SELECT * FROM job_results WHERE 1 = 0")).keys())
    assert cols == [name for name, _ in schema_doc.view_columns(schema_doc.view_sql())]


def test_example_queries_run_on_both_backends(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    path = write_jsonl(tmp_path / "in.jsonl", [*translate_rows(6), "not json"])
    submit_and_run(db, path, "translate")  # the older job
    newer = submit(db, path, "translate")
    run(db, newer, _failing_first)  # the newer one, with a failure
    assert EXAMPLES
    for title, _, sql in EXAMPLES:
        with run_readonly_query(db_url, sql.strip()) as res:
            rows = list(res.rows)
        assert rows, f"{title}: no rows"
        assert len(res.columns) >= 2 or title == "Progress of the latest job"
    sql_of = {t: s for t, _, s in EXAMPLES}
    with run_readonly_query(db_url, sql_of["Latency percentiles"]) as res:
        ((p50, p90, p99, top, n),) = list(res.rows)
    assert n == 4 and p50 <= p90 <= p99 <= top
    with run_readonly_query(db_url, sql_of["Compare two jobs' scores"]) as res:
        by_metric = {r[0]: r for r in res.rows}
    assert set(by_metric) == {"bleu", "chrf"} and by_metric["chrf"][1] == 4  # one failure per chunk


def test_backend_example_queries_run_on_their_backend(db_url: str, tmp_path: Path) -> None:
    """The JSON examples, each in its backend's spelling: a field of valid structured answers
    only, and each answer's mean token log-probability."""
    import json

    from sqlalchemy import select, update

    from lmjobs.db.example_queries import BACKEND_EXAMPLES
    from lmjobs.db.models import Request

    db = get_database(db_url)
    lines = [{"prompt": f"what animal is {i}"} for i in range(6)]
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", lines), "generate", chunk_size=3)
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["cat", "dog", "owl"]}},
        "required": ["label"],
    }
    fmt = {"kind": "json_schema", "spec": json.dumps(schema, sort_keys=True, separators=(",", ":"))}
    with db.session() as s:  # what the input side stores for --json-schema and --logprobs
        for rid, line in s.execute(select(Request.id, Request.line_number).where(Request.job_id == job_id)):
            cut = {"max_new_tokens": 1} if line == 6 else {}  # one answer cut inside its JSON
            params = {"output_format": fmt, "logprobs": 2, "n": 2, "temperature": 1.0, **cut}
            s.execute(update(Request).where(Request.id == rid).values(params_json=params))
    run(db, job_id)
    with db.session() as s:
        rows = s.execute(
            text("SELECT output_text, valid FROM results WHERE job_id = :j"), {"j": job_id}
        ).all()
    want: dict[str, int] = {}
    for out, valid in rows:
        if valid:
            label = json.loads(out)["label"]
            want[label] = want.get(label, 0) + 1
    assert sum(want.values()) == 10 and len(rows) == 12
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    sql_of = {title: by_backend[backend] for title, _, by_backend in BACKEND_EXAMPLES}
    with run_readonly_query(db_url, sql_of["A field of structured answers"].strip()) as res:
        assert {label: int(n) for label, n in res.rows} == want
    with run_readonly_query(db_url, sql_of["Least confident answers"].strip()) as res:
        confidences = list(res.rows)
    assert len(confidences) == 12
    means = [float(r[4]) for r in confidences]
    assert means == sorted(means) and all(-0.5 <= m <= 0 for m in means)
