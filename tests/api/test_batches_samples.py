"""n samples and log-probabilities through the Batch API: the official openai client against a
real ``lmjobs serve`` and a real worker (fake engine). Each output line is one request whose
choices are its samples, validated with the openai client's own types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from apikit import ALIAS, ServerProcess, api_env, new_key, wait_status, write_lines
from openai.types import Completion
from openai.types.chat import ChatCompletion
from services import WorkerProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _chat(i: int, **body: Any) -> str:
    messages = [{"role": "user", "content": f"alpha beta gamma {i}"}]
    return json.dumps(
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": ALIAS, "messages": messages, "max_tokens": 16, **body},
        }
    )


def _completion(i: int, **body: Any) -> str:
    return json.dumps(
        {
            "custom_id": f"cmpl-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": ALIAS, "prompt": f"once upon a time {i}", "max_tokens": 16, **body},
        }
    )


def _run_batch(client: openai.OpenAI, src: Path, endpoint: Any) -> list[dict[str, Any]]:
    with open(src, "rb") as fh:
        f = client.files.create(file=fh, purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    assert batch.errors is None or not batch.errors.data, batch.errors
    done = wait_status(client, batch.id, ("completed", "failed", "expired", "cancelled"))
    assert done.status == "completed" and done.output_file_id and done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.completed == done.request_counts.total
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    usage = done.usage
    assert usage is not None
    bodies = [o["response"]["body"] for o in out]
    assert usage.output_tokens == sum(b["usage"]["completion_tokens"] for b in bodies)
    assert usage.input_tokens == sum(b["usage"]["prompt_tokens"] for b in bodies)  # a prompt once
    return out


def test_batch_output_lines_carry_every_sample_and_logprobs(
    db_url: str, redis_url: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    env = api_env(lmjobs_home, db_url, redis_url)
    key = new_key(env, "alice")
    server = ServerProcess(env, tmp_path / "server.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        client = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
        chat_src = write_lines(
            tmp_path / "chat.jsonl",
            [
                _chat(0, n=3, temperature=0.7, logprobs=True, top_logprobs=3),
                _chat(1),
                _chat(2, n=2, logprobs=True),
            ],
        )
        out = _run_batch(client, chat_src, "/v1/chat/completions")
        assert [o["custom_id"] for o in out] == ["chat-0", "chat-1", "chat-2"]
        bodies = [ChatCompletion.model_validate(o["response"]["body"]) for o in out]
        first, plain, greedy = bodies
        assert [c.index for c in first.choices] == [0, 1, 2]
        assert len({c.message.content for c in first.choices}) == 3  # sampled
        for c in first.choices:
            assert c.logprobs is not None and c.logprobs.content
            assert "".join(t.token for t in c.logprobs.content) == c.message.content
            assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
        assert first.usage is not None and first.usage.completion_tokens == sum(
            len(c.logprobs.content or []) for c in first.choices if c.logprobs
        )
        assert len(plain.choices) == 1 and plain.choices[0].logprobs is None
        assert [c.message.content for c in greedy.choices][0] == greedy.choices[1].message.content
        assert all(
            c.logprobs and c.logprobs.content and not c.logprobs.content[0].top_logprobs
            for c in greedy.choices
        )

        cmpl_src = write_lines(tmp_path / "cmpl.jsonl", [_completion(0, n=2, temperature=0.5, logprobs=2)])
        (line,) = _run_batch(client, cmpl_src, "/v1/completions")
        comp = Completion.model_validate(line["response"]["body"])
        assert comp.object == "text_completion" and [c.index for c in comp.choices] == [0, 1]
        for c in comp.choices:
            assert c.logprobs is not None and c.logprobs.tokens and c.logprobs.top_logprobs
            assert "".join(c.logprobs.tokens) == c.text
            assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    finally:
        worker.stop()
        server.stop()
