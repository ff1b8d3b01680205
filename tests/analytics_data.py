"""Jobs with results for the analytics tests: written by the real ingest, run by the real
chunk service with the fake engine (no model, deterministic answers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fake_engine import FakeEngine

from lmjobs.db.models import utcnow
from lmjobs.db.session import Database
from lmjobs.jobs.chunks import ChunkContext
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.engine_api import GenerateFn
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.lifecycle import start_due_jobs
from lmjobs.jobs.submit import SubmitOptions

FAKE_CTX = ChunkContext(worker="test-worker", model_info=FakeEngine().info)


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def translate_rows(n: int, *, with_reference: bool = True) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        text = f"the cat number {i} sat on the mat"
        row: dict[str, Any] = {"id": f"t{i}", "text": text, "target_lang": "de"}
        if with_reference:
            row["reference"] = f"mat the on sat {i} number cat" if i % 3 else f"die Katze {i}"
        rows.append(row)
    return rows


def submit(db: Database, path: Path, task: str, **opts: Any) -> int:
    opts.setdefault("model", "fake")
    opts.setdefault("chunk_size", 4)
    return create_job(db, path, SubmitOptions(task=task, **opts)).job_id


def run(db: Database, job_id: int, generate: GenerateFn | None = None) -> None:
    start_due_jobs(db, utcnow())
    run_job_locally(db, job_id, generate=generate or FakeEngine(), ctx=FAKE_CTX)


def submit_and_run(db: Database, path: Path, task: str, **opts: Any) -> int:
    job_id = submit(db, path, task, **opts)
    run(db, job_id)
    return job_id
