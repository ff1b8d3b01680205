"""The OpenAI Batch API end to end: the official openai client against a real ``lmjobs serve``,
a real worker (fake engine: the only fake is the model), real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from apikit import ServerProcess, api_env, chat_line, new_key, wait_status, write_lines
from openai.types.chat import ChatCompletion
from services import WorkerProcess, cli_json, run_cli

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_upload_create_poll_download(db_url: str, redis_url: str, tmp_path: Path, lmjobs_home: Path) -> None:
    env = api_env(lmjobs_home, db_url, redis_url)
    alice, bob = new_key(env, "alice"), new_key(env, "bob")
    good = [chat_line(i, f"alpha beta gamma {i}") for i in range(6)]
    lines = [*good[:3], "{not json", *good[3:], chat_line(99, "x", model="no-such-model")]
    src = write_lines(tmp_path / "in.jsonl", lines)
    server = ServerProcess(env, tmp_path / "server.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        client = openai.OpenAI(base_url=server.url, api_key=alice, max_retries=0)
        with open(src, "rb") as fh:
            f = client.files.create(file=fh, purpose="batch")
        assert f.bytes == src.stat().st_size and f.purpose == "batch"
        batch = client.batches.create(
            input_file_id=f.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"project": "demo"},
        )
        # the worker is already running: on a fast machine it can finish the six lines before
        # the create call reads the batch back
        assert batch.status in ("in_progress", "finalizing", "completed"), batch.status
        assert batch.metadata == {"project": "demo"}
        errors = {e.line: e for e in batch.errors.data} if batch.errors and batch.errors.data else {}
        assert set(errors) == {4, 8}
        assert errors[8].code == "model_not_found" and errors[8].param == "body.model"
        done = wait_status(client, batch.id, ("completed", "failed", "expired", "cancelled"))
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            6,
            6,
            0,
        )
        assert done.completed_at and done.in_progress_at and done.finalizing_at
        assert done.usage is not None and done.usage.total_tokens > 0
        assert done.output_file_id and done.error_file_id is None
        out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(6)]
        for o in out:
            assert o["error"] is None and o["response"]["status_code"] == 200
            ChatCompletion.model_validate(o["response"]["body"])  # the openai client's own type
        assert "0 gamma beta alpha" in out[0]["response"]["body"]["choices"][0]["message"]["content"]
        assert [b.id for b in client.batches.list()] == [batch.id]

        # the batch is a job like any other
        job_id = done.model_extra["lmjobs_job_id"]
        st = cli_json(["status", str(job_id)], env)
        assert st["status"] == "completed"
        rows = cli_json(["query", f"SELECT COUNT(*) AS n FROM results WHERE job_id = {job_id}"], env)
        assert "6" in json.dumps(rows)
        report = run_cli(["report", str(job_id)], env, check=True).stdout
        assert batch.id in report or str(job_id) in report

        # another key sees nothing of alice's
        other = openai.OpenAI(base_url=server.url, api_key=bob, max_retries=0)
        for call in (
            lambda: other.batches.retrieve(batch.id),
            lambda: other.files.retrieve(f.id),
            lambda: other.files.content(f.id),
            lambda: other.files.content(done.output_file_id or ""),
            lambda: other.batches.cancel(batch.id),
            lambda: other.files.delete(f.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert list(other.batches.list()) == [] and list(other.files.list()) == []
        # a wrong key; no key at all (the client refuses to send none, so a plain request)
        for key in ("sk-lmjobs-wrong", "not-even-the-shape"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=server.url, api_key=key, max_retries=0).batches.list()
        for path in ("/batches", f"/batches/{batch.id}", f"/files/{f.id}/content"):
            with pytest.raises(urllib.error.HTTPError) as no_key:
                urllib.request.urlopen(server.url + path, timeout=10)
            assert no_key.value.code == 401
            assert json.loads(no_key.value.read())["error"]["code"] == "missing_api_key"
    finally:
        worker.stop()
        server.stop()
    for key in (alice, bob):
        assert key not in server.log() and key not in worker.log()
