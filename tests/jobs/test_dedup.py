"""Identical greedy prompts are generated once per job, across chunks; the saving is reported."""

from __future__ import annotations

import json
from pathlib import Path

from fake_engine import FakeEngine

from lmjobs.db.session import get_database
from lmjobs.jobs.chunks import ChunkContext
from lmjobs.jobs.control import job_status
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.submit import SubmitOptions


class CountingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def __call__(self, requests):  # type: ignore[no-untyped-def, override]
        self.seen.extend(r.key for r in requests)
        return super().__call__(requests)


def _ctx() -> ChunkContext:
    return ChunkContext(worker="t", model_info=FakeEngine().info)


def test_identical_prompts_across_chunks_run_once(db_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    # 4 distinct prompts, each 5 times, spread over chunks of 3
    src.write_text("".join(json.dumps({"prompt": f"same words {i % 4}"}) + "\n" for i in range(20)))
    db = get_database(db_url)
    rep = create_job(db, src, SubmitOptions(task="generate", model="fake", chunk_size=3))
    engine = CountingEngine()
    run_job_locally(db, rep.job_id, generate=engine, ctx=_ctx())
    st = job_status(db, rep.job_id)
    assert st.status == "completed" and st.succeeded == 20
    # three consecutive lines never repeat a prompt, so each chunk's new prompts are
    # distinct within it: only the first time each of the 4 prompts appears is generated
    assert len(engine.seen) == 4
    assert st.deduplicated == 16


def test_sampled_prompts_are_not_shared(db_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": "same", "temperature": 0.8}) + "\n" for _ in range(6)))
    db = get_database(db_url)
    rep = create_job(db, src, SubmitOptions(task="generate", model="fake", chunk_size=2))
    engine = CountingEngine()
    run_job_locally(db, rep.job_id, generate=engine, ctx=_ctx())
    assert len(engine.seen) == 6
    assert job_status(db, rep.job_id).deduplicated == 0


def test_the_copy_keeps_the_requests_own_params(db_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": "p", "max_new_tokens": 7}) + "\n" for _ in range(4)))
    db = get_database(db_url)
    rep = create_job(db, src, SubmitOptions(task="generate", model="fake", chunk_size=1))
    run_job_locally(db, rep.job_id, generate=CountingEngine(), ctx=_ctx())
    from sqlalchemy import select

    from lmjobs.db.models import Result

    with db.session() as s:
        rows = s.execute(select(Result.params_json, Result.deduplicated)).all()
    assert all(p["max_new_tokens"] == 7 for p, _ in rows)
    assert sum(d for _, d in rows) == 3
