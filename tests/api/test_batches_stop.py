"""A running batch cancelled, and one past its completion window: both end with the rows that
finished kept (output file) and the others reported (error file), as OpenAI does."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from apikit import ServerProcess, api_env, chat_line, new_key, wait_status, write_lines
from services import WorkerProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def _check_split(client: openai.OpenAI, b: object, code: str) -> None:
    counts = b.request_counts  # type: ignore[attr-defined]
    out, err = _lines(client, b.output_file_id), _lines(client, b.error_file_id)  # type: ignore[attr-defined]
    assert 0 < len(out) == counts.completed < 20
    assert len(err) == counts.failed == 20 - len(out)
    assert {e["error"]["code"] for e in err} == {code}
    assert sorted(o["custom_id"] for o in out + err) == sorted(f"req-{i}" for i in range(20))


def _start(client: openai.OpenAI, tmp: Path, name: str, window: str) -> str:
    src = write_lines(tmp / f"{name}.jsonl", [chat_line(i, f"words {name} {i}") for i in range(20)])
    with open(src, "rb") as fh:
        f = client.files.create(file=fh, purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window=window
    ).id


def _wait_some_done(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.batches.retrieve(batch_id).request_counts.completed < 2:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no request finished"
        time.sleep(0.2)


def test_cancel_and_expiry_keep_the_finished_rows(
    db_url: str, redis_url: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    env = api_env(lmjobs_home, db_url, redis_url, LMJOBS_FAKE_DELAY_MS="400")
    server = ServerProcess(env, tmp_path / "server.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        client = openai.OpenAI(base_url=server.url, api_key=new_key(env, "k"), max_retries=0)
        first = _start(client, tmp_path, "cancel", "24h")
        _wait_some_done(client, first)
        cancelling = client.batches.cancel(first)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        b = wait_status(client, first, ("cancelled",), timeout=60)
        assert b.cancelled_at and b.completed_at is None
        _check_split(client, b, "batch_cancelled")
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(first)

        second = _start(client, tmp_path, "expire", "5s")
        e = wait_status(client, second, ("expired", "completed"), timeout=60)
        assert e.status == "expired" and e.expired_at and e.expires_at
        assert e.expired_at >= e.expires_at
        _check_split(client, e, "batch_expired")
    finally:
        worker.stop()
        server.stop()
