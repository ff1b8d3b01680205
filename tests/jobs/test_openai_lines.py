"""OpenAI Batch lines: every field is honoured or the line is refused with the field named
(DESIGN.md item 8), the requested model is recorded and exported, and lines that ask for a
model other than the job's are counted, warned about, and refused by --strict."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from analytics_data import FAKE_CTX, write_jsonl
from fake_engine import FakeEngine
from services import run_cli
from sqlalchemy import select

from lmjobs.db.models import Reject, Request
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.embedded import run_job_locally
from lmjobs.jobs.engine_api import Generation, GenRequest
from lmjobs.jobs.errors import InputFileError
from lmjobs.jobs.export import COLUMNS, write_results
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.inputs import LineError, ParsedRequest, parse_line
from lmjobs.jobs.params import SAMPLING_KEYS
from lmjobs.jobs.submit import SubmitOptions

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
U = [{"role": "user", "content": "Hello there"}]


def line(url: str | None = CHAT, custom_id: str = "r1", **body: Any) -> dict[str, Any]:
    body.setdefault("model", "gpt-4o-mini")
    if url == COMPLETIONS:
        body.setdefault("prompt", "Once upon a time")
    else:
        body.setdefault("messages", U)
    out: dict[str, Any] = {"custom_id": custom_id, "method": "POST", "body": body}
    if url is not None:
        out["url"] = url
    return out


def parse(obj: dict[str, Any] | str, task: str = "summarize") -> ParsedRequest | LineError:
    raw = obj if isinstance(obj, str) else json.dumps(obj)
    return parse_line(raw.encode(), 7, task)


def accepted(obj: dict[str, Any] | str, task: str = "summarize") -> ParsedRequest:
    r = parse(obj, task)
    assert isinstance(r, ParsedRequest), r
    return r


def refused(obj: dict[str, Any] | str, task: str = "summarize") -> str:
    r = parse(obj, task)
    assert isinstance(r, LineError), r
    assert r.line_number == 7 and "\n" not in r.reason
    return r.reason


def test_the_base_lines_of_these_tests_are_accepted() -> None:
    chat = accepted(line())
    assert (chat.task, chat.input, chat.params, chat.model) == ("chat", {"messages": U}, None, "gpt-4o-mini")
    done = accepted(line(COMPLETIONS))
    assert (done.task, done.input, done.params) == ("generate", {"prompt": "Once upon a time"}, None)


# --- refused fields: one case each, the field's name in the reason ------------------------------

REFUSED: list[tuple[str, Any, str]] = [
    ("stream", True, CHAT),
    ("stream_options", {"include_usage": True}, CHAT),
    ("tools", [{"type": "function", "function": {"name": "f"}}], CHAT),
    ("tool_choice", "auto", CHAT),
    ("functions", [{"name": "f", "parameters": {}}], CHAT),
    ("function_call", "auto", CHAT),
    ("parallel_tool_calls", False, CHAT),
    ("audio", {"voice": "alloy", "format": "wav"}, CHAT),
    ("modalities", ["text", "audio"], CHAT),
    ("prediction", {"type": "content", "content": "x"}, CHAT),
    ("web_search_options", {}, CHAT),
    ("reasoning_effort", "low", CHAT),
    ("service_tier", "flex", CHAT),
    ("suffix", "The end.", COMPLETIONS),
    ("echo", True, COMPLETIONS),
    ("best_of", 2, COMPLETIONS),
    ("store", True, CHAT),
]


@pytest.mark.parametrize(("field", "value", "url"), REFUSED, ids=[f for f, _, _ in REFUSED])
def test_an_unsupported_option_refuses_the_line_naming_it(field: str, value: Any, url: str) -> None:
    reason = refused(line(url, **{field: value}))
    assert reason.startswith(f"body.{field}: "), reason
    accepted(line(url))  # the same line without it is fine


def test_stream_true_says_why() -> None:
    assert refused(line(stream=True)) == "body.stream: stream is not supported in a batch"


@pytest.mark.parametrize(
    "body",
    [
        {"stream": False},
        {"best_of": 1},
        {"store": False},
        {"echo": False},
        {"tools": []},
        {"functions": []},
        {"tool_choice": "none"},
        {"function_call": "none"},
        {"modalities": ["text"]},
        {"tools": None, "top_logprobs": None, "suffix": None, "seed": None},  # null is absent
        {"response_format": None, "logprobs": None, "n": None},
    ],
)
def test_a_value_that_asks_for_nothing_is_accepted(body: dict[str, Any]) -> None:
    r = accepted(line(**body))
    assert (r.input, r.params, r.model) == ({"messages": U}, None, "gpt-4o-mini")


@pytest.mark.parametrize(("field", "value"), [("n", 0), ("n", True), ("stream", 0), ("best_of", 1.0)])
def test_a_no_op_value_must_have_its_type(field: str, value: Any) -> None:
    assert refused(line(**{field: value})).startswith(f"body.{field}: ")


def test_an_unknown_body_field_is_unsupported() -> None:
    assert refused(line(frobnicate=1)) == "unsupported field 'body.frobnicate'"
    assert accepted(line(frobnicate=None)).params is None  # null: absent


def test_an_unknown_line_field_is_unsupported() -> None:
    obj = {**line(), "priority": 5}
    assert refused(obj) == "unsupported field 'priority'"
    assert accepted({**line(), "reference": "Hi", "method": "POST"}).reference == "Hi"


def test_an_unknown_message_field_is_unsupported() -> None:
    reason = refused(line(messages=[{"role": "user", "content": "x", "name": "bob"}]))
    assert reason == "unsupported field 'body.messages[0].name'"
    tool_calls = [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, *U]
    assert "'body.messages[0].tool_calls'" in refused(line(messages=tool_calls))
    null_name = [{"role": "user", "content": "x", "name": None}]
    assert accepted(line(messages=null_name)).input == {"messages": [{"role": "user", "content": "x"}]}


def test_an_unknown_field_of_a_text_part_is_unsupported() -> None:
    part = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    reason = refused(line(messages=[{"role": "user", "content": [part]}]))
    assert reason == "body.messages[0].content: unsupported field 'cache_control' in a text part"


def test_several_problems_are_listed_three_at_most() -> None:
    reason = refused(line(tools=[{}], stream=True, a=1, b=2, c=3))
    assert reason == (
        f"body.tools: {'tool and function calling is not supported'}; "
        "body.stream: stream is not supported in a batch; unsupported field 'body.a'; and 2 more"
    )


def test_a_bad_url_is_named_before_the_body() -> None:
    reason = refused({"custom_id": "e", "url": "/v1/embeddings", "body": {"input": "x"}})
    assert reason.startswith("url: Input should be '/v1/chat/completions' or '/v1/completions'")


# --- honoured fields -----------------------------------------------------------------------


def test_penalties_and_logit_bias_are_sampling_overrides() -> None:
    r = accepted(line(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"50256": -100, "007": 2.5}))
    assert r.params == {
        "presence_penalty": 0.5,
        "frequency_penalty": -1.0,
        "logit_bias": {"50256": -100.0, "7": 2.5},  # token ids as canonical decimal strings
    }
    assert {"presence_penalty", "frequency_penalty", "logit_bias"} <= set(SAMPLING_KEYS), (
        "SamplingParams (jobs/engine_api.py) lacks the penalty fields"
    )
    assert accepted(line(logit_bias={})).params is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"presence_penalty": 2.5}, "body.presence_penalty: Input should be less than or equal to 2"),
        ({"frequency_penalty": -3}, "body.frequency_penalty: Input should be greater than or equal to -2"),
        ({"presence_penalty": "1"}, "body.presence_penalty: Input should be a valid number"),
        ({"logit_bias": {"abc": 1}}, "body.logit_bias: key 'abc' is not a token id"),
        ({"logit_bias": {"-1": 1}}, "body.logit_bias: key '-1' is not a token id"),
        ({"logit_bias": {"99999999999": 1}}, "body.logit_bias: key '99999999999' is not a token id"),
        ({"logit_bias": {"1": 101}}, "body.logit_bias: the bias of token 1 must be between -100 and 100"),
        ({"logit_bias": {"1": True}}, "body.logit_bias: the bias of token 1 must be a number"),
        ({"logit_bias": {"7": 1, "07": 2}}, "body.logit_bias: token id 7 appears twice"),
        ({"logit_bias": [1, 2]}, "body.logit_bias: must be an object"),
        ({"user": 5}, "body.user: Input should be a valid string"),
        ({"metadata": "x"}, "body.metadata: Input should be a valid dictionary"),
        ({"model": ""}, "body.model: String should have at least 1 character"),
        ({"model": "m" * 501}, "body.model: String should have at most 500 characters"),
    ],
)
def test_honoured_fields_are_checked(body: dict[str, Any], fragment: str) -> None:
    assert fragment in refused(line(**body))


def test_user_and_metadata_are_kept_with_the_input() -> None:
    r = accepted(line(user="user-42", metadata={"batch": "nightly"}))
    assert r.input == {"messages": U, "user": "user-42", "metadata": {"batch": "nightly"}}
    assert r.params is None


def test_native_lines_take_the_same_sampling_fields_and_a_model() -> None:
    r = accepted({"text": "t", "presence_penalty": 1, "logit_bias": {"3": 1}, "model": "m1", "col": 1})
    assert r.params == {"presence_penalty": 1.0, "logit_bias": {"3": 1.0}}
    assert (r.input, r.model) == ({"text": "t"}, "m1")  # "col": the file's own data, ignored


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 5), ("max_completion_tokens", 5), ("top_k", 5), ("tools", [{}]), ("logprobs", True)],
)
def test_native_lines_refuse_option_names_they_do_not_take(field: str, value: Any) -> None:
    assert refused({"text": "t", field: value}).startswith(f"{field}: ")
    accepted({"text": "t", field: None})


# --- the database: params, the requested model, rejects, mismatches -----------------------------


def _submit(db_url: str, path: Path, **kw: Any) -> tuple[Database, Any]:
    db = get_database(db_url)
    opts = SubmitOptions(task="summarize", model="fake", chunk_size=2, **kw)
    return db, create_job(db, path, opts)


def _requests(db: Database, job_id: int) -> list[Request]:
    with db.session() as s:
        return list(s.scalars(select(Request).where(Request.job_id == job_id).order_by(Request.line_number)))


def test_new_sampling_fields_reach_the_stored_params_and_the_engine(db_url: str, tmp_path: Path) -> None:
    rows = [
        line(custom_id="p", presence_penalty=0.75),
        line(custom_id="f", frequency_penalty=-0.5),
        line(custom_id="b", logit_bias={"11": 5, "2": -100}),
        line(custom_id="plain"),
    ]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows))
    stored = {r.custom_id: r.params_json for r in _requests(db, rep.job_id)}
    assert stored == {
        "p": {"presence_penalty": 0.75},
        "f": {"frequency_penalty": -0.5},
        "b": {"logit_bias": {"11": 5.0, "2": -100.0}},
        "plain": None,
    }
    seen: dict[int, GenRequest] = {}

    def generate(reqs: Any) -> list[Generation]:
        seen.update({r.key: r for r in reqs})
        return FakeEngine()(reqs)

    run_job_locally(db, rep.job_id, generate=generate, ctx=FAKE_CTX)
    by_id = {r.custom_id: seen[r.id].params for r in _requests(db, rep.job_id)}
    assert by_id["p"].presence_penalty == 0.75 and by_id["p"].frequency_penalty == 0.0
    assert by_id["f"].frequency_penalty == -0.5
    assert by_id["b"].logit_bias == ((2, -100.0), (11, 5.0))
    assert by_id["plain"].logit_bias == () and by_id["plain"].presence_penalty == 0.0


BODIES: list[tuple[str, dict[str, Any]]] = [("a", {}), ("b", {"tools": [{}]}), ("c", {"zap": 1})]


def test_a_refused_field_is_a_per_line_reject_and_good_lines_still_run(db_url: str, tmp_path: Path) -> None:
    rows = [line(custom_id=c, model="fake", **body) for c, body in BODIES]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows))
    assert (rep.requests_total, rep.lines_rejected) == (1, 2)
    with db.session() as s:
        rejects = s.execute(
            select(Reject.line_number, Reject.reason).where(Reject.job_id == rep.job_id)
        ).all()
    assert sorted(rejects) == [
        (2, "body.tools: tool and function calling is not supported"),
        (3, "unsupported field 'body.zap'"),
    ]
    with pytest.raises(InputFileError, match=r"line 2: body\.tools: .*--strict refuses the file"):
        _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows), strict=True)


def test_the_requested_model_is_stored_and_mismatches_counted(db_url: str, tmp_path: Path) -> None:
    rows = [
        line(custom_id="same", model="fake"),
        line(custom_id="none", model=None),
        line(custom_id="dup", model="other-a"),
        line(custom_id="dup", model="other-z"),  # a duplicate id: rejected, not counted
        line(custom_id="x", model="other-b"),
        line(custom_id="bad", model="other-c", stream=True),  # rejected, not counted
        {"id": "native", "text": "t", "model": "other-d"},
    ]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows))
    stored = {r.custom_id: r.requested_model for r in _requests(db, rep.job_id)}
    assert stored == {"same": "fake", "none": None, "dup": "other-a", "x": "other-b", "native": "other-d"}
    assert (rep.model, rep.model_mismatches, rep.first_model_mismatch) == ("fake", 3, (3, "other-a"))
    assert rep.lines_rejected == 2


def test_strict_refuses_a_file_with_a_model_mismatch(db_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [line(custom_id="a", model="fake"), line(custom_id="b")])
    with pytest.raises(InputFileError) as exc:
        _submit(db_url, path, strict=True)
    assert "line 2: the line asks for model 'gpt-4o-mini', not the job's 'fake'" in str(exc.value)
    same = write_jsonl(
        tmp_path / "same.jsonl", [line(custom_id="a", model="fake"), line(custom_id="b", model=None)]
    )
    assert _submit(db_url, same, strict=True)[1].model_mismatches == 0


# --- exports --------------------------------------------------------------------------------------


def _export(db: Database, job_id: int, fmt: str) -> Any:
    if fmt == "parquet":
        buf = io.BytesIO()
        write_results(db, job_id, fmt, buf)
        buf.seek(0)
        return pq.read_table(buf).to_pylist()
    out = io.StringIO()
    write_results(db, job_id, fmt, out)
    text = out.getvalue()
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(x) for x in text.splitlines()]


def test_exports_carry_the_requested_model_beside_the_model_that_ran(db_url: str, tmp_path: Path) -> None:
    rows = [line(custom_id="a", model="gpt-4o-mini"), line(custom_id="b", model=None)]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows))
    run_job_locally(db, rep.job_id, generate=FakeEngine(), ctx=FAKE_CTX)
    assert "requested_model" in COLUMNS
    for fmt in ("jsonl", "csv", "parquet"):
        got = [(r["custom_id"], r["model"], r["requested_model"]) for r in _export(db, rep.job_id, fmt)]
        empty = "" if fmt == "csv" else None  # CSV: an empty cell is NULL
        assert got == [("a", "fake", "gpt-4o-mini"), ("b", "fake", empty)], fmt
    # OpenAI's own output names the model that ran (e.g. "gpt-4o-mini-2024-07-18"), so does ours.
    openai = _export(db, rep.job_id, "openai")
    assert [o["response"]["body"]["model"] for o in openai] == ["fake", "fake"]


# --- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def env(fake_engine_env: dict[str, str]) -> dict[str, str]:
    return {**fake_engine_env, "LMJOBS_MODEL": "fake"}


def _mismatch_file(tmp_path: Path) -> Path:
    rows = [line(custom_id="a", model="fake"), line(custom_id="b", model="gpt-4o"), line(custom_id="c")]
    return write_jsonl(tmp_path / "batch.jsonl", rows)


def test_submit_warns_about_lines_for_another_model(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["submit", str(_mismatch_file(tmp_path)), "--task", "chat", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert "2 lines ask for a model other than the job's 'fake'" in proc.stderr
    assert "the first: line 2 asks for 'gpt-4o'" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["requests"] == 3
    assert (out["model_mismatches"], out["first_model_mismatch"]) == (2, {"line": 2, "model": "gpt-4o"})


def test_submit_without_mismatches_says_nothing_of_models(env: dict[str, str], tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ok.jsonl", [line(custom_id="a", model="fake"), line(custom_id="b", model=None)]
    )
    proc = run_cli(["submit", str(path), "--task", "chat", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert "model other than" not in proc.stderr
    assert json.loads(proc.stdout)["model_mismatches"] == 0


def test_strict_submit_refuses_naming_the_first_line(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["submit", str(_mismatch_file(tmp_path)), "--task", "chat", "--strict"], env)
    assert proc.returncode != 0
    assert "line 2: the line asks for model 'gpt-4o', not the job's 'fake'" in proc.stderr
    assert "--strict refuses the file" in proc.stderr
    assert run_cli(["list", "--json"], env, check=True).stdout.strip() in ("[]", "")


def test_run_warns_too(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["run", str(_mismatch_file(tmp_path)), "--task", "chat"], env)
    assert proc.returncode == 0, proc.stderr
    assert "2 lines ask for a model other than the job's 'fake'" in proc.stderr
