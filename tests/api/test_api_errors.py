"""Every refusal of the API, as the openai client sees it: OpenAI's error shape and status,
the field named; rejected lines with their numbers; keys made, listed and revoked."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from apikit import ALIAS, ServerProcess, api_env, chat_line, new_key, wait_status
from openai.types import Completion
from services import WorkerProcess, run_cli

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def env(sqlite_url: str, redis_url: str, lmjobs_home: Path) -> dict[str, str]:
    return api_env(lmjobs_home, sqlite_url, redis_url)


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(env, tmp_path / "server.log").start()
    yield s
    s.stop()


def _upload(client: openai.OpenAI, lines: list[str]) -> str:
    data = "".join(line + "\n" for line in lines).encode()
    return client.files.create(file=("in.jsonl", data), purpose="batch").id


def _create(client: openai.OpenAI, file_id: str, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    args.update(kw)
    return client.batches.create(**args)


def test_batch_create_refusals(env: dict[str, str], server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url, api_key=new_key(env, "k"), max_retries=0)
    fid = _upload(client, [chat_line(0, "hello there")])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"extra_body": {"priority": 5}}, "priority"),
        (
            {"extra_body": {"output_expires_after": {"anchor": "created_at", "seconds": 3600}}},
            "output_expires_after",
        ),
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "2d"}, "completion_window"),
        ({"completion_window": "0h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            _create(client, fid, **kw)
        assert err.value.status_code == 400
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == param, (kw, body)
        assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        _create(client, "file-doesnotexist")
    with pytest.raises(openai.BadRequestError, match="Missing required parameter"):
        client.post(
            "/batches", body={"input_file_id": fid, "endpoint": "/v1/chat/completions"}, cast_to=object
        )
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.post(
            "/batches",
            body={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": 24},
            cast_to=object,
        )
    for bad in ({"limit": 0}, {"limit": 101}):
        with pytest.raises(openai.BadRequestError):
            client.batches.list(**bad)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.files.list(order="sideways")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.list(after="batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    assert list(client.batches.list()) == []  # nothing was made by the refusals
    # no request names a path: ids are looked up, never joined to the folder
    for file_id in ("../lmjobs.db", "..%2F..%2Fetc%2Fpasswd", fid + "/../" + fid):
        with pytest.raises(openai.NotFoundError):
            client.files.content(file_id)
    odd = client.files.create(file=("../../x.jsonl", b"{}\n"), purpose="batch")  # a label, not a path
    assert odd.filename == "../../x.jsonl" and client.files.content(odd.id).content == b"{}\n"


def test_rejected_lines_and_a_batch_with_no_valid_line(env: dict[str, str], server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url, api_key=new_key(env, "k"), max_retries=0)
    completion_line = json.dumps(
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": ALIAS, "prompt": "x"},
        }
    )
    no_model = json.dumps(
        {
            "custom_id": "m",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "x"}]},
        }
    )
    lines = [
        chat_line(1, "fine"),  # 1
        chat_line(2, "other model", model="Qwen/Qwen2.5-0.5B-Instruct"),  # 2: not the batch's model
        completion_line,  # 3: not the batch's endpoint
        no_model,  # 4
        json.dumps({"prompt": "a native line"}),  # 5
        chat_line(6, "a local path", model="/etc/passwd"),  # 6
        json.dumps(
            {
                "custom_id": "t",
                "url": "/v1/chat/completions",
                "body": {"model": ALIAS, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            }
        ),  # 7
    ]
    b = _create(client, _upload(client, lines))
    assert b.status == "in_progress" and b.request_counts.total == 1
    codes = {e.line: (e.code, e.param) for e in b.errors.data}
    assert codes == {
        2: ("mismatched_model", "body.model"),
        3: ("mismatched_endpoint", "url"),
        4: ("missing_required_parameter", "body.model"),
        5: ("invalid_request", None),
        6: ("model_not_found", "body.model"),
        7: ("invalid_request", None),
    }
    assert "tools" in next(e.message for e in b.errors.data if e.line == 7)
    # the job's rejects say the same (lmjobs rejects)
    rejects = run_cli(["rejects", str(b.model_extra["lmjobs_job_id"])], env, check=True).stdout
    assert "mismatched_model" in rejects and "model_not_found" in rejects

    failed = _create(client, _upload(client, ["{oops", chat_line(2, "x", model="nothing-here")]))
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    assert [(e.line, e.code) for e in failed.errors.data] == [(1, "invalid_request"), (2, "model_not_found")]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(failed.id)
    out_file = client.files.create(file=("o.jsonl", b"{}\n"), purpose="batch")
    client.files.delete(out_file.id)
    with pytest.raises(openai.NotFoundError):
        _create(client, out_file.id)


def test_completions_endpoint_and_list_pages(
    env: dict[str, str], server: ServerProcess, tmp_path: Path
) -> None:
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        client = openai.OpenAI(base_url=server.url, api_key=new_key(env, "k"), max_retries=0)
        lines = [
            json.dumps(
                {
                    "custom_id": f"p{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": ALIAS, "prompt": f"one two three {i}", "max_tokens": 8},
                }
            )
            for i in range(3)
        ]
        fid = _upload(client, lines)
        ids = [_create(client, fid, endpoint="/v1/completions").id for _ in range(3)]
        for batch_id in ids:
            b = wait_status(client, batch_id, ("completed",))
            out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
            assert [o["custom_id"] for o in out] == ["p0", "p1", "p2"]
            for o in out:
                Completion.model_validate(o["response"]["body"])
                assert o["response"]["body"]["object"] == "text_completion"
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
        rest = client.batches.list(limit=2, after=page.data[-1].id)
        assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
        assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # the client pages on
        outputs = [f.id for f in client.files.list(purpose="batch_output")]
        assert len(outputs) == 3
    finally:
        worker.stop()


def test_keys_made_listed_revoked(env: dict[str, str], server: ServerProcess) -> None:
    made = run_cli(["keys", "create", "carol"], env, check=True)
    key = made.stdout.strip()
    assert key.startswith("sk-lmjobs-") and "shown only now" in made.stderr
    dup = run_cli(["keys", "create", "carol"], env)
    assert dup.returncode == 1 and "exists already" in dup.stderr and "Traceback" not in dup.stderr
    bad = run_cli(["keys", "create", "no spaces"], env)
    assert bad.returncode == 2 and "key name" in bad.stderr
    listed = run_cli(["keys", "list"], env, check=True).stdout
    assert "carol" in listed and key not in listed
    client = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
    assert list(client.files.list()) == []
    run_cli(["keys", "revoke", "carol"], env, check=True)
    with pytest.raises(openai.AuthenticationError):
        client.files.list()
    again = run_cli(["keys", "revoke", "carol"], env)
    assert again.returncode == 1 and "revoked already" in again.stderr
    unknown = run_cli(["keys", "revoke", "dave"], env)
    assert unknown.returncode == 1 and "no key named" in unknown.stderr
    # a malformed Authorization header: 401 in OpenAI's shape
    req = urllib.request.Request(server.url + "/files", headers={"Authorization": "Basic abc"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401 and json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
    assert key not in server.log()
