"""End to end through real processes: `lmjobs submit` -> Redis -> `lmjobs worker` (Celery,
solo pool) -> SQL, on SQLite and PostgreSQL, with a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from services import WorkerProcess, cli_env, cli_json, run_cli, wait_for_job
from sqlalchemy import func, select, text
from tiny_models import build_tiny_causal

from lmjobs.db.models import Request, Result
from lmjobs.db.session import get_database

pytestmark = [pytest.mark.slow, pytest.mark.redis]

N_VALID = 300
# line number -> malformed content (1-based line numbers in the written file)
BAD_LINES = {
    7: "{not json",
    50: json.dumps({"id": "x50", "text": 12}),
    51: "",
    120: json.dumps(["a", "list"]),
    121: json.dumps({"id": "dup", "text": "first"}),  # valid; its twin below is the bad one
    122: json.dumps({"id": "dup", "text": "second"}),
    200: json.dumps({"id": "nan", "text": "x", "temperature": float("nan")}),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def write_input(path: Path) -> tuple[set[int], set[int]]:
    """Returns (valid line numbers, rejected line numbers)."""
    valid, bad = set(), set()
    line_no, i = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while i < N_VALID:
            line_no += 1
            if line_no in BAD_LINES:
                fh.write(BAD_LINES[line_no] + "\n")
                (valid if line_no == 121 else bad).add(line_no)
                continue
            fh.write(json.dumps({"id": f"doc-{i}", "text": f"the cat sat on mat number {i % 17}"}) + "\n")
            valid.add(line_no)
            i += 1
    return valid, bad


def _env(db_url: str, redis_url: str, model: Path, home: Path) -> dict[str, str]:
    return cli_env(
        LMJOBS_HOME=str(home),
        LMJOBS_DATABASE_URL=db_url,
        LMJOBS_BROKER_URL=redis_url,
        LMJOBS_MODEL=str(model),
        LMJOBS_CHUNK_SIZE="32",
    )


def test_job_runs_through_a_real_worker(
    db_url: str, redis_url: str, tiny_model: Path, tmp_path: Path, lmjobs_home: Path
) -> None:
    env = _env(db_url, redis_url, tiny_model, lmjobs_home)
    src = tmp_path / "prompts.jsonl"
    valid, bad = write_input(src)

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        sub = run_cli(["submit", str(src), "--task", "summarize", "--max-new-tokens", "8", "--json"], env)
        assert sub.returncode == 0, sub.stderr
        info = json.loads(sub.stdout)
        job_id = info["job_id"]
        assert info["requests"] == len(valid)
        assert info["rejected"] == len(bad)
        # every malformed line is reported with its line number
        for line_no in bad:
            assert f"line {line_no}:" in sub.stderr
        st = wait_for_job(env, job_id, timeout=600)
    finally:
        worker.stop()

    assert st["status"] == "completed", worker.log()[-3000:]
    db = get_database(db_url)
    with db.session() as s:
        n_results = s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id))
        n_distinct = s.scalar(
            select(func.count(func.distinct(Result.request_id))).where(Result.job_id == job_id)
        )
        lines = set(s.scalars(select(Request.line_number).where(Request.job_id == job_id)))
        by_status = dict(
            s.execute(
                text("SELECT status, count(*) FROM results WHERE job_id = :j GROUP BY status"),
                {"j": job_id},
            ).all()
        )
        workers = set(s.scalars(select(Result.worker).where(Result.job_id == job_id)))
    # exactly one result row per valid line, and only those
    assert lines == valid
    assert n_results == n_distinct == len(valid)
    # status agrees with the database
    assert st["succeeded"] == by_status.get("succeeded", 0)
    assert st["failed"] == by_status.get("failed", 0)
    assert st["succeeded"] + st["failed"] == len(valid)
    assert st["pending"] == 0
    assert st["lines_rejected"] == len(bad)
    assert len(workers) == 1

    rejects = cli_json(["rejects", str(job_id)], env)
    assert {r["line_number"] for r in rejects} == bad

    # results agree with the database
    out = run_cli(["results", str(job_id), "--format", "jsonl"], env, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(valid)
    assert {r["line_number"] for r in rows} == valid
    assert all(r["status"] == "succeeded" and r["output_tokens"] >= 1 for r in rows)
    assert all(r["model_revision"] and r["template_version"] == "summarize/v1" for r in rows)


def test_openai_batch_file_keeps_custom_ids(
    sqlite_url: str, redis_url: str, tiny_model: Path, tmp_path: Path, lmjobs_home: Path
) -> None:
    env = _env(sqlite_url, redis_url, tiny_model, lmjobs_home)
    src = tmp_path / "batch.jsonl"
    with open(src, "w") as fh:
        for i in range(40):
            body: dict = {"model": "any", "max_tokens": 6}
            if i % 2:
                body["messages"] = [{"role": "user", "content": f"say hello number {i}"}]
                url = "/v1/chat/completions"
            else:
                body["prompt"] = f"the dog ran {i}"
                url = "/v1/completions"
            fh.write(
                json.dumps({"custom_id": f"req-{i:03d}", "method": "POST", "url": url, "body": body}) + "\n"
            )
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        job_id = cli_json(["submit", str(src), "--task", "chat"], env)["job_id"]
        st = wait_for_job(env, job_id)
    finally:
        worker.stop()
    assert st["status"] == "completed"
    out = run_cli(["results", str(job_id), "--format", "openai"], env, check=True)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["custom_id"] for x in lines] == [f"req-{i:03d}" for i in range(40)]
    assert all(x["error"] is None and x["response"]["status_code"] == 200 for x in lines)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 6 for x in lines)
    db = get_database(sqlite_url)
    with db.session() as s:
        params = list(s.scalars(select(Result.params_json).where(Result.job_id == job_id)))
    assert all(p["max_new_tokens"] == 6 for p in params)  # per-request max_tokens honoured
