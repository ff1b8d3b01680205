"""Structured outputs, log-probabilities and n samples on the input side: jobs/formats.py
checks what the user asks for, job options (jobs/params.py), native and OpenAI line fields
carry it, and it reaches the stored params, the content hash and the engine's GenRequest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from analytics_data import write_jsonl
from sqlalchemy import select

from lmjobs.db.models import Job, Reject, Request
from lmjobs.db.session import Database, get_database
from lmjobs.jobs import formats
from lmjobs.jobs.engine_api import OutputFormat, SamplingParams
from lmjobs.jobs.engine_requests import build_gen_request
from lmjobs.jobs.errors import InputFileError, UsageError
from lmjobs.jobs.formats import (
    OutputFormatError,
    choice_format,
    regex_format,
    response_format,
    schema_file_format,
    schema_format,
)
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.inputs import LineError, ParsedRequest, parse_line
from lmjobs.jobs.params import job_params, sampling_params
from lmjobs.jobs.submit import SubmitOptions

# OpenAI's strict-mode subset: objects with properties/required/additionalProperties false,
# arrays, enums, anyOf, $defs/$ref, string/number/integer/boolean/null.
STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "nothing": {"type": "null"},
        "mood": {"type": "string", "enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "pet": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}]},
    },
    "required": ["name", "age", "score", "ok", "nothing", "mood", "tags", "pet"],
    "additionalProperties": False,
    "$defs": {
        "pet": {
            "type": "object",
            "properties": {"kind": {"type": "string"}},
            "required": ["kind"],
            "additionalProperties": False,
        }
    },
}
SPEC = json.dumps(STRICT_SCHEMA, sort_keys=True, separators=(",", ":"))
SIMPLE = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
U = [{"role": "user", "content": "Hi"}]


def rf_schema(**wrapper: Any) -> dict[str, Any]:
    """OpenAI's response_format of type json_schema."""
    return {"type": "json_schema", "json_schema": wrapper}


def one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


# --- jobs/formats.py ----------------------------------------------------------------------------


def test_a_strict_mode_schema_is_accepted_with_a_canonical_spec() -> None:
    fmt = schema_format(STRICT_SCHEMA)
    assert fmt == OutputFormat("json_schema", SPEC)
    shuffled = json.loads(json.dumps(STRICT_SCHEMA))
    shuffled = dict(reversed(list(shuffled.items())))
    assert schema_format(shuffled).spec == SPEC  # key order does not matter
    wrapped = {"name": "person", "schema": STRICT_SCHEMA, "strict": True, "description": "a person"}
    assert schema_format(wrapped) == fmt  # OpenAI's wrapper is unwrapped


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "frob"}, "invalid JSON schema: Invalid type: frob"),
        ({"not": {"type": "string"}}, 'invalid JSON schema: Unimplemented keys: ["not"]'),
        ({"$ref": "#/$defs/missing"}, "invalid JSON schema: Pointer '/$defs/missing' does not exist"),
        (
            {"type": "string", "pattern": "[a-"},
            "invalid JSON schema: regex parse error: unclosed character class",
        ),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "invalid JSON schema: Unsatisfiable schema"),
        ([{"type": "string"}], "a JSON schema must be an object, got an array"),
        (True, "a JSON schema must be an object, got true"),
    ],
)
def test_an_invalid_schema_is_refused_with_llguidance_s_reason_on_one_line(schema: Any, reason: str) -> None:
    with pytest.raises(OutputFormatError) as exc:
        schema_format(schema)
    assert str(exc.value).startswith(reason), exc.value
    assert one_line(str(exc.value))
    assert isinstance(exc.value, UsageError) and exc.value.exit_code == 2


def test_choices_are_a_json_list_in_the_caller_s_order() -> None:
    assert choice_format(["yes", "no", "maybe"]) == OutputFormat("choice", '["yes","no","maybe"]')
    assert json.loads(choice_format(["é", 'a "b"']).spec) == ["é", 'a "b"']


@pytest.mark.parametrize(
    ("choices", "reason"),
    [
        ([], "choices must not be empty"),
        (["a", "b", "a"], "choice 'a' appears twice"),
        (["a", ""], "a choice must not be an empty string"),
        (["a", 1], "choices must be a list of strings"),
        ("ab", "choices must be a list of strings"),
    ],
)
def test_bad_choices_are_refused(choices: Any, reason: str) -> None:
    with pytest.raises(OutputFormatError, match=f"^{reason}$"):
        choice_format(choices)


def test_a_regex_is_kept_as_written() -> None:
    assert regex_format(r"\d{3}-[A-Z]+") == OutputFormat("regex", r"\d{3}-[A-Z]+")
    assert regex_format("a/b").spec == "a/b"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("[a-", "invalid regex: regex parse error: unclosed character class"),
        ("a{5,2}", "invalid regex: regex parse error: invalid repetition count range"),
        ("(?=a)b", "invalid regex: regex parse error: look-around"),
        ("ab\\", "invalid regex: it ends with an unescaped backslash"),
        ("", "a regex must not be empty"),
        (5, "a regex must be a string, got a number"),
    ],
)
def test_an_invalid_regex_is_refused_on_one_line(pattern: Any, reason: str) -> None:
    with pytest.raises(OutputFormatError) as exc:
        regex_format(pattern)
    assert str(exc.value).startswith(reason) and one_line(str(exc.value)), exc.value


def test_validation_is_cached_by_spec() -> None:
    formats._problem.cache_clear()
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    for _ in range(1000):
        schema_format(dict(schema))
    info = formats._problem.cache_info()
    assert (info.misses, info.hits) == (1, 999)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, OutputFormat("json_object")),
        (rf_schema(name="p", schema=STRICT_SCHEMA), OutputFormat("json_schema", SPEC)),
        (
            rf_schema(name="p", schema=STRICT_SCHEMA, strict=False, description="d"),
            OutputFormat("json_schema", SPEC),
        ),
    ],
)
def test_openai_response_formats(value: dict[str, Any], expected: OutputFormat | None) -> None:
    assert response_format(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"type": "xml"}, "rf.type: unknown type 'xml' (use text, json_object or json_schema)"),
        ({}, "missing field 'rf.type'"),
        ("json", "rf: must be an object, got a string"),
        ({"type": "json_schema"}, "missing field 'rf.json_schema'"),
        (rf_schema(name="p"), "missing field 'rf.json_schema.schema'"),
        (rf_schema(schema=SIMPLE), "missing field 'rf.json_schema.name'"),
        (rf_schema(name="a b", schema=SIMPLE), "rf.json_schema.name: must be"),
        (rf_schema(name="p", schema=SIMPLE, strict="yes"), "rf.json_schema.strict: must be a boolean"),
        (rf_schema(name="p", schema=SIMPLE, x=1), "unsupported field 'rf.json_schema.x'"),
        ({"type": "json_object", "schema": SIMPLE}, "unsupported field 'rf.schema' for type 'json_object'"),
        (
            rf_schema(name="p", schema={"type": "frob"}),
            "rf.json_schema.schema: invalid JSON schema: Invalid type: frob",
        ),
    ],
)
def test_bad_openai_response_formats_name_the_field(value: Any, reason: str) -> None:
    with pytest.raises(OutputFormatError) as exc:
        response_format(value, "rf")
    assert str(exc.value).startswith(reason) and one_line(str(exc.value)), exc.value


def test_a_schema_file_and_its_problems(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"name": "person", "schema": STRICT_SCHEMA, "strict": True}, indent=2))
    assert schema_file_format(f) == OutputFormat("json_schema", SPEC)
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(SIMPLE).encode())  # a BOM is an encoding mark
    assert schema_file_format(f).kind == "json_schema"
    cases = {
        "{": "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        '{"type": NaN}': "invalid JSON: NaN is not valid JSON",
        '{"type": "frob"}': "invalid JSON schema: Invalid type: frob",
        "[1]": "a JSON schema must be an object, got an array",
    }
    for text, reason in cases.items():
        f.write_text(text)
        with pytest.raises(OutputFormatError, match="^" + re.escape(f"{f}: {reason}")):
            schema_file_format(f)
    with pytest.raises(OutputFormatError, match="no such file"):
        schema_file_format(tmp_path / "missing.json")
    with pytest.raises(OutputFormatError, match="not a file"):
        schema_file_format(tmp_path)
    f.write_bytes(b'{"type": "\xff"}')
    with pytest.raises(OutputFormatError, match="invalid UTF-8 at byte 10"):
        schema_file_format(f)


# --- job options (jobs/params.py) ----------------------------------------------------------------


def test_job_options_are_stored_in_the_job_params(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps(STRICT_SCHEMA))
    assert job_params(json_schema=f, logprobs=5, n=3) == {
        "max_new_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": [],
        "output_format": {"kind": "json_schema", "spec": SPEC},
        "logprobs": 5,
        "n": 3,
    }
    assert job_params(json_object=True)["output_format"] == {"kind": "json_object", "spec": ""}
    assert job_params(choice=["a", "b"])["output_format"] == {"kind": "choice", "spec": '["a","b"]'}
    assert job_params(regex="[0-9]+")["output_format"] == {"kind": "regex", "spec": "[0-9]+"}
    assert job_params(logprobs=0)["logprobs"] == 0  # 0 is a value: the sampled token alone
    assert job_params(seed=0)["seed"] == 0
    assert "output_format" not in job_params() and "n" not in job_params() and "logprobs" not in job_params()


def test_job_options_reach_sampling_params() -> None:
    sp = sampling_params(job_params(choice=["x", "y"], logprobs=2, n=4), None)
    assert (sp.output_format, sp.logprobs, sp.n) == (OutputFormat("choice", '["x","y"]'), 2, 4)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"regex": "[a-"}, "--regex: invalid regex: regex parse error: unclosed character class"),
        ({"choice": []}, "--choice: choices must not be empty"),
        ({"choice": ["a", "a"]}, "--choice: choice 'a' appears twice"),
        ({"choice": [""]}, "--choice: a choice must not be an empty string"),
        ({"regex": "a", "json_object": True}, "--json-object and --regex: use at most one output format"),
        ({"logprobs": 21}, "--logprobs must be between 0 and 20"),
        ({"logprobs": -1}, "--logprobs must be between 0 and 20"),
        ({"n": 0}, "--n must be between 1 and 128"),
        ({"n": 129}, "--n must be between 1 and 128"),
    ],
)
def test_bad_job_options_are_usage_errors(kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(UsageError) as exc:
        job_params(**kw)
    assert str(exc.value) == reason and exc.value.exit_code == 2


def test_a_bad_schema_file_option_names_the_option_and_the_file(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text('{"type": "object", "properties": {"a": {"not": {}}}}')
    with pytest.raises(UsageError) as exc:
        job_params(json_schema=f)
    assert str(exc.value) == f'--json-schema: {f}: invalid JSON schema: Unimplemented keys: ["not"]'
    with pytest.raises(UsageError, match="--json-schema and --choice: use at most one output format"):
        job_params(json_schema=f, choice=["a"])


# --- native lines ---------------------------------------------------------------------------------


def parse(obj: dict[str, Any], task: str = "summarize") -> ParsedRequest | LineError:
    return parse_line(json.dumps(obj).encode(), 7, task)


def params_of(obj: dict[str, Any], task: str = "summarize") -> dict[str, Any] | None:
    r = parse(obj, task)
    assert isinstance(r, ParsedRequest), r
    return r.params


def reason_of(obj: dict[str, Any], task: str = "summarize") -> str:
    r = parse(obj, task)
    assert isinstance(r, LineError), r
    assert r.line_number == 7 and one_line(r.reason)
    return r.reason


def test_native_fields_become_the_request_s_params() -> None:
    assert params_of(
        {"text": "t", "json_schema": STRICT_SCHEMA, "logprobs": 3, "n": 2, "temperature": 1}
    ) == {
        "temperature": 1.0,
        "output_format": {"kind": "json_schema", "spec": SPEC},
        "logprobs": 3,
        "n": 2,
    }
    assert params_of({"text": "t", "json_object": True}) == {
        "output_format": {"kind": "json_object", "spec": ""}
    }
    assert params_of({"text": "t", "choices": ["a", "b"]}) == {
        "output_format": {"kind": "choice", "spec": '["a","b"]'}
    }
    assert params_of({"prompt": "p", "regex": "[0-9]+"}, "generate") == {
        "output_format": {"kind": "regex", "spec": "[0-9]+"}
    }
    assert params_of({"text": "t", "n": 1, "logprobs": 0}) == {"n": 1, "logprobs": 0}
    assert params_of({"text": "t", "json_schema": None, "choices": None, "n": None}) is None  # null: absent
    assert params_of({"text": "t"}) is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"json_schema": {"type": "frob"}}, "json_schema: invalid JSON schema: Invalid type: frob"),
        ({"json_schema": "{}"}, "json_schema: a JSON schema must be an object, got a string"),
        ({"regex": "[a-"}, "regex: invalid regex: regex parse error: unclosed character class"),
        ({"choices": []}, "choices: choices must not be empty"),
        ({"choices": ["a", "a"]}, "choices: choice 'a' appears twice"),
        ({"json_object": False}, "json_object: must be true (leave it out for free text)"),
        ({"choices": ["a"], "regex": "a"}, "choices, regex: at most one output format per line"),
        (
            {"json_schema": SIMPLE, "json_object": True},
            "json_schema, json_object: at most one output format per line",
        ),
        ({"logprobs": 21}, "logprobs: must be between 0 and 20, got 21"),
        ({"logprobs": True}, "logprobs: must be an integer from 0 to 20, got true"),
        ({"n": 0}, "n: must be between 1 and 128, got 0"),
        ({"n": 129}, "n: must be between 1 and 128, got 129"),
        ({"n": "2"}, "n: must be an integer, got a string"),
        (
            {"response_format": {"type": "json_object"}},
            "response_format: native lines take json_schema, json_object, choices or",
        ),
        ({"top_logprobs": 3}, "top_logprobs: native lines take logprobs: K"),
    ],
)
def test_a_bad_native_field_rejects_the_line_naming_it(fields: dict[str, Any], reason: str) -> None:
    assert reason_of({"text": "t", **fields}).startswith(reason)


# --- OpenAI lines -----------------------------------------------------------------------------------


def chat(**body: Any) -> dict[str, Any]:
    return {
        "custom_id": "c",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": U, **body},
    }


def completion(**body: Any) -> dict[str, Any]:
    return {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", **body}}


JSON_SCHEMA_RF = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": STRICT_SCHEMA, "strict": True},
}


@pytest.mark.parametrize(
    ("obj", "params"),
    [
        (
            chat(response_format={"type": "json_object"}),
            {"output_format": {"kind": "json_object", "spec": ""}},
        ),
        (chat(response_format=JSON_SCHEMA_RF), {"output_format": {"kind": "json_schema", "spec": SPEC}}),
        (
            completion(response_format=JSON_SCHEMA_RF),
            {"output_format": {"kind": "json_schema", "spec": SPEC}},
        ),
        (chat(logprobs=True), {"logprobs": 0}),
        (chat(logprobs=True, top_logprobs=20), {"logprobs": 20}),
        (chat(logprobs=True, top_logprobs=0), {"logprobs": 0}),
        (completion(logprobs=5), {"logprobs": 5}),
        (completion(logprobs=0), {"logprobs": 0}),
        (chat(n=3, temperature=1), {"temperature": 1.0, "n": 3}),
        (completion(n=128), {"n": 128}),
        (chat(n=1), {"n": 1}),  # explicit: overrides a job's --n
        # "none", even in a job with a format or --logprobs (jobs/params.py: CLEARABLE_KEYS)
        (chat(logprobs=False), {"logprobs": False}),
        (chat(response_format={"type": "text"}), {"output_format": False}),
        (chat(response_format=None, logprobs=None, top_logprobs=None, n=None), None),
    ],
)
def test_openai_lines_with_these_fields_are_accepted(
    obj: dict[str, Any], params: dict[str, Any] | None
) -> None:
    assert params_of(obj) == params


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (chat(top_logprobs=3), "body.top_logprobs: requires logprobs: true"),
        (chat(logprobs=False, top_logprobs=3), "body.top_logprobs: requires logprobs: true"),
        (chat(logprobs=True, top_logprobs=21), "body.top_logprobs: must be between 0 and 20, got 21"),
        (
            chat(logprobs=True, top_logprobs=True),
            "body.top_logprobs: must be an integer from 0 to 20, got true",
        ),
        (chat(logprobs=3), "body.logprobs: must be a boolean for /v1/chat/completions"),
        (completion(logprobs=6), "body.logprobs: must be between 0 and 5, got 6"),
        (completion(logprobs=True), "body.logprobs: must be an integer from 0 to 5, got true"),
        (completion(logprobs=2, top_logprobs=2), "body.top_logprobs: not a /v1/completions field"),
        (chat(n=0), "body.n: Input should be greater than or equal to 1"),
        (chat(n=129), "body.n: Input should be less than or equal to 128"),
        (chat(n=2.0), "body.n: Input should be a valid integer"),
        (chat(response_format={"type": "xml"}), "body.response_format.type: unknown type 'xml'"),
        (
            chat(response_format=rf_schema(name="p")),
            "missing field 'body.response_format.json_schema.schema'",
        ),
        (
            chat(response_format=rf_schema(name="p", schema={"not": {}})),
            "body.response_format.json_schema.schema: invalid JSON schema: Unimplemented",
        ),
        (chat(response_format="json"), "body.response_format: must be an object, got a string"),
        (
            chat(response_format={"type": "json_object", "strict": True}),
            "unsupported field 'body.response_format.strict'",
        ),
    ],
)
def test_bad_openai_fields_refuse_the_line_naming_the_field(obj: dict[str, Any], reason: str) -> None:
    assert reason_of(obj).startswith(reason)


def test_a_line_s_none_clears_the_job_s_format_and_logprobs() -> None:
    job = job_params(regex="[0-9]+", logprobs=4, n=2)
    cleared = sampling_params(job, {"output_format": False, "logprobs": False})
    assert (cleared.output_format, cleared.logprobs, cleared.n) == (None, None, 2)
    line_own = sampling_params(
        job, {"output_format": {"kind": "json_object", "spec": ""}, "logprobs": 1, "n": 1}
    )
    assert (line_own.output_format, line_own.logprobs, line_own.n) == (OutputFormat("json_object"), 1, 1)
    assert sampling_params(job, None).output_format == OutputFormat("regex", "[0-9]+")


# --- the database: stored params, rejects, content hashes, GenRequest -----------------------------


def _submit(db_url: str, path: Path, task: str = "summarize", **params: Any) -> tuple[Database, Any]:
    db = get_database(db_url)
    opts = SubmitOptions(task=task, model="fake", chunk_size=2, params=job_params(**params))
    return db, create_job(db, path, opts)


def _requests(db: Database, job_id: int) -> list[Request]:
    with db.session() as s:
        return list(s.scalars(select(Request).where(Request.job_id == job_id).order_by(Request.line_number)))


def _gen_params(db: Database, job_id: int) -> dict[str, SamplingParams]:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        reqs = s.scalars(select(Request).where(Request.job_id == job_id)).all()
        return {r.custom_id: build_gen_request(r, job).params for r in reqs}


def test_line_fields_and_job_options_reach_the_engine(db_url: str, tmp_path: Path) -> None:
    rows = [
        {"id": "job", "text": "t1"},
        {"id": "schema", "text": "t2", "json_schema": SIMPLE, "logprobs": 1},
        {"id": "choices", "text": "t3", "choices": ["a", "b"], "n": 1},
        chat(response_format={"type": "json_object"}, logprobs=True, top_logprobs=2, n=3)
        | {"custom_id": "oa"},
        chat(response_format={"type": "text"}, logprobs=False) | {"custom_id": "none"},
    ]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows), regex="[0-9]+", logprobs=5, n=2)
    assert (rep.requests_total, rep.lines_rejected) == (5, 0)
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.id == rep.job_id)).one()
        assert job.params_json["output_format"] == {"kind": "regex", "spec": "[0-9]+"}
        assert (job.params_json["logprobs"], job.params_json["n"]) == (5, 2)
    simple = json.dumps(SIMPLE, sort_keys=True, separators=(",", ":"))
    stored = {r.custom_id: r.params_json for r in _requests(db, rep.job_id)}
    assert stored == {
        "job": None,
        "schema": {"output_format": {"kind": "json_schema", "spec": simple}, "logprobs": 1},
        "choices": {"output_format": {"kind": "choice", "spec": '["a","b"]'}, "n": 1},
        "oa": {"n": 3, "logprobs": 2, "output_format": {"kind": "json_object", "spec": ""}},
        "none": {"logprobs": False, "output_format": False},
    }
    got = {k: (p.output_format, p.logprobs, p.n) for k, p in _gen_params(db, rep.job_id).items()}
    assert got == {
        "job": (OutputFormat("regex", "[0-9]+"), 5, 2),
        "schema": (OutputFormat("json_schema", simple), 1, 2),
        "choices": (OutputFormat("choice", '["a","b"]'), 5, 1),
        "oa": (OutputFormat("json_object"), 2, 3),
        "none": (None, None, 2),
    }


def test_a_bad_line_is_a_reject_with_its_number_and_the_others_run(db_url: str, tmp_path: Path) -> None:
    rows = [
        {"id": "a", "text": "t", "json_schema": SIMPLE},
        {"id": "b", "text": "t", "regex": "(?<=x)y"},
        {"id": "c", "text": "t", "choices": ["x", "x"]},
        chat(top_logprobs=2) | {"custom_id": "d"},
        chat(response_format={"type": "grammar"}) | {"custom_id": "e"},
        {"id": "f", "text": "t", "n": 500},
        {"id": "g", "text": "t"},
    ]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows))
    assert (rep.requests_total, rep.lines_rejected) == (2, 5)
    assert [r.custom_id for r in _requests(db, rep.job_id)] == ["a", "g"]
    with db.session() as s:
        rejects = dict(
            s.execute(select(Reject.line_number, Reject.reason).where(Reject.job_id == rep.job_id)).all()
        )
    assert sorted(rejects) == [2, 3, 4, 5, 6]
    assert rejects[2].startswith("regex: invalid regex: ")
    assert rejects[3] == "choices: choice 'x' appears twice"
    assert rejects[4] == "body.top_logprobs: requires logprobs: true"
    assert rejects[5].startswith("body.response_format.type: unknown type 'grammar'")
    assert rejects[6] == "n: must be between 1 and 128, got 500"
    assert all(one_line(r) for r in rejects.values())
    strict = SubmitOptions(task="summarize", model="fake", params=job_params(), strict=True)
    with pytest.raises(InputFileError, match=r"line 2: regex: invalid regex: .*--strict refuses the file"):
        create_job(db, write_jsonl(tmp_path / "in2.jsonl", rows), strict)


# Hashes of these lines computed by the code before output formats existed (commit 0382c19):
# lines that do not use the new fields keep their content hash, so dedup and resume across the
# upgrade still match them.
CHAT_NO_OPS = (
    '{"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
    '"messages": [{"role": "user", "content": "Hi"}], "n": 1, "logprobs": false, '
    '"response_format": {"type": "text"}}}'
)
COMPLETION = (
    '{"custom_id": "c2", "url": "/v1/completions", '
    '"body": {"model": "m", "prompt": "Hello", "max_tokens": 9}}'
)
UNCHANGED: list[tuple[str, str, dict[str, Any], str]] = [
    (
        '{"id": "a", "text": "The cat sat on the mat."}',
        "summarize",
        {},
        "8bc7466b81390822274087fb5cd88cb58b812b11afdb809198fe54037e7ad0e5",
    ),
    (
        '{"prompt": "Once upon a time", "temperature": 0.7, "seed": 3}',
        "generate",
        {"max_new_tokens": 64},
        "3ab4a1b544ce05aac14756fc8c43b3e10ccfd3836cc217b8a9b70c7101ef7ce9",
    ),
    (CHAT_NO_OPS, "chat", {}, "dbd63a6e99dffebf35aabd8dd5e9ae6aceb0da5593188bc46fe047e44d6d77d9"),
    (
        COMPLETION,
        "generate",
        {"temperature": 0.5, "seed": 7},
        "cae27aeb230e548c37807c6f8b68c90591d98586f532fea3a7a48cad65af2c23",
    ),
]


@pytest.mark.parametrize(("raw", "task", "options", "sha"), UNCHANGED)
def test_content_hashes_of_lines_without_the_new_fields_are_unchanged(
    db_url: str, tmp_path: Path, raw: str, task: str, options: dict[str, Any], sha: str
) -> None:
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", [raw]), task, **options)
    assert [r.content_sha256 for r in _requests(db, rep.job_id)] == [sha]


def test_a_format_n_or_logprobs_changes_the_content_hash(db_url: str, tmp_path: Path) -> None:
    base = {"text": "The cat sat on the mat."}
    rows = [
        {"id": "plain", **base},
        {"id": "schema", **base, "json_schema": SIMPLE},
        {"id": "schema2", **base, "json_schema": dict(reversed(list(SIMPLE.items())))},  # same schema
        {"id": "choices", **base, "choices": ["a", "b"]},
        {"id": "regex", **base, "regex": "a|b"},
        {"id": "object", **base, "json_object": True},
        {"id": "logprobs", **base, "logprobs": 0},
        {"id": "n", **base, "n": 2},
        {"id": "n1", **base, "n": 1},  # the default: the same request as plain
    ]
    db, rep = _submit(db_url, write_jsonl(tmp_path / "in.jsonl", rows))
    sha = {r.custom_id: r.content_sha256 for r in _requests(db, rep.job_id)}
    assert sha["plain"] == UNCHANGED[0][3]
    assert sha["schema"] == sha["schema2"] and sha["n1"] == sha["plain"]
    distinct = {k: v for k, v in sha.items() if k not in ("schema2", "n1")}
    assert len(set(distinct.values())) == len(distinct)
    # The same format from the job's options hashes as from the line.
    db2, rep2 = _submit(db_url, write_jsonl(tmp_path / "job.jsonl", [{"id": "x", **base}]), choice=["a", "b"])
    assert [r.content_sha256 for r in _requests(db2, rep2.job_id)] == [sha["choices"]]
