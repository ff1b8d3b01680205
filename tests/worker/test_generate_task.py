"""The generate task continues the prompt as is (DESIGN.md item 8): through the whole job
path (ingest, chunk service, engine), with no flag, its greedy output equals one prompt at a
time ``model.generate`` on the raw prompt, token for token (fp32), for a model that has a
chat template (tiny llama) and one that has none (tiny gpt2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from lmjobs.db.models import Job, JobStatus, Request, Result, utcnow
from lmjobs.db.session import get_database
from lmjobs.jobs.chunks import ChunkContext
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.lifecycle import start_due_jobs
from lmjobs.jobs.params import job_params
from lmjobs.jobs.submit import SubmitOptions
from lmjobs.worker.engine.core import EngineConfig, generate
from lmjobs.worker.models import load_model

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "Numbers like 42 and 3.14",
    "Hi",
    "Workers pull jobs from the queue and",
]
NEW_TOKENS = 12


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_model_generate_on_the_raw_prompt(
    arch: str, request: pytest.FixtureRequest, model_cache_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    folder: Path = request.getfixturevalue(f"tiny_{arch}_dir")
    lm = load_model(str(folder), device="cpu", dtype="float32", cache_dir=model_cache_dir)
    assert bool(lm.tokenizer.chat_template) == (arch == "llama")  # both cases covered

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    db = get_database(sqlite_url)
    opts = SubmitOptions(task="generate", model=str(folder), params=job_params(max_new_tokens=NEW_TOKENS))
    job_id = create_job(db, src, opts).job_id
    start_due_jobs(db, utcnow())
    ctx = ChunkContext(worker="t", model_info=lm.info)
    run_job_locally(
        db, job_id, generate=lambda reqs: generate(lm.model, lm.tokenizer, reqs, EngineConfig()), ctx=ctx
    )

    with db.session() as s:
        rows = s.execute(
            select(Request.line_number, Result.output_text, Result.input_tokens, Result.output_tokens)
            .join(Result, Result.request_id == Request.id)
            .where(Request.job_id == job_id)
            .order_by(Request.line_number)
        ).all()
    assert len(rows) == len(PROMPTS)
    for (line, text, n_in, n_out), prompt in zip(rows, PROMPTS, strict=True):
        ids = lm.tokenizer(prompt)["input_ids"]  # what the seed's loop feeds: the text as is
        out = lm.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=lm.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        assert n_in == len(ids), f"line {line}: the prompt went through a template"
        assert (text, n_out) == (lm.tokenizer.decode(out, skip_special_tokens=True), len(out)), line
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.COMPLETED.value
        assert job.template_version == "generate/v2"
