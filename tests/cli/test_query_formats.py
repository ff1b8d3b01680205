"""`lmjobs query` in every output format, as a subprocess, on SQLite and PostgreSQL: the
rows read back (csv, json) equal the database, and more rows than one fetch batch stream."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from analytics_data import run, submit, write_jsonl
from services import cli_env, run_cli
from sqlalchemy import text

from lmjobs.db.readonly import FETCH_BATCH
from lmjobs.db.session import get_database

N = FETCH_BATCH + 234  # more than one fetch batch
SQL = "SELECT id, custom_id, line_number, reference FROM requests ORDER BY id"


def _populate(db_url: str, tmp_path: Path) -> list[tuple[int, str, int, str | None]]:
    db = get_database(db_url)
    rows = [{"id": f"r-{i}", "prompt": f"p {i}", "reference": 'ü, "q"' if i % 2 else None} for i in range(N)]
    submit(db, write_jsonl(tmp_path / "big.jsonl", rows), "generate", chunk_size=500)
    small = submit(db, write_jsonl(tmp_path / "small.jsonl", [{"prompt": "x y"}] * 3), "generate")
    run(db, small)
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(SQL))]  # type: ignore[misc]


def test_every_format_equals_the_database(db_url: str, tmp_path: Path) -> None:
    truth = _populate(db_url, tmp_path)
    assert len(truth) == N + 3
    env = cli_env(LMJOBS_DATABASE_URL=db_url)

    out = run_cli(["query", SQL, "--format", "csv"], env, check=True).stdout
    got = list(csv.reader(io.StringIO(out, newline="")))
    assert got[0] == ["id", "custom_id", "line_number", "reference"]
    assert [(int(a), b, int(c), d or None) for a, b, c, d in got[1:]] == truth

    for args in (["--format", "json"], ["--json"]):
        data = json.loads(run_cli(["query", SQL, *args], env, check=True).stdout)
        assert [(r["id"], r["custom_id"], r["line_number"], r["reference"]) for r in data] == truth

    table = run_cli(["query", SQL, "--format", "table"], env, check=True).stdout
    header = [ln for ln in table.splitlines() if ln.startswith("┃")]
    body = [ln for ln in table.splitlines() if ln.startswith("│")]  # one line per row
    assert header[0].replace("┃", " ").split() == ["id", "custom_id", "line_number", "reference"]
    assert [int(ln.split("│")[1]) for ln in body] == [r[0] for r in truth]

    limited = run_cli(["query", SQL, "--format", "csv", "--limit", "7"], env, check=True).stdout
    assert len(list(csv.reader(io.StringIO(limited)))) == 8


def test_empty_result_and_errors(sqlite_url: str) -> None:
    env = cli_env(LMJOBS_DATABASE_URL=sqlite_url)
    none = "SELECT id, status FROM jobs WHERE id < 0"
    assert json.loads(run_cli(["query", none, "--json"], env, check=True).stdout) == []
    assert run_cli(["query", none, "-f", "csv"], env, check=True).stdout.split() == ["id,status"]
    refused = run_cli(["query", "DELETE FROM jobs"], env)
    assert refused.returncode != 0 and "refused" in refused.stderr
    assert "Traceback" not in refused.stderr
