"""The output-format job options (--json-schema, --json-object, --choice, --regex, --logprobs,
--n) on run, submit and schedule add: stored with the job, applied to its requests, and
refused before anything is written (exit code 2, one line) when invalid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from services import cli_json, run_cli
from sqlalchemy import select

from lmjobs.db.models import Job
from lmjobs.db.session import get_database

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
    "required": ["label"],
    "additionalProperties": False,
}
SPEC = json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))


@pytest.fixture
def env(fake_engine_env: dict[str, str]) -> dict[str, str]:
    return {**fake_engine_env, "LMJOBS_MODEL": "fake"}


def _file(tmp_path: Path, n: int = 2) -> Path:
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"words number {i}"}) + "\n" for i in range(n)))
    return f


def _paths(text: str, paths: dict[str, Path]) -> str:
    for name, path in paths.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _job_params(home: Path) -> list[dict[str, Any]]:
    db_file = home / "lmjobs.db"
    if not db_file.exists():
        return []
    with get_database(f"sqlite:///{db_file}").session() as s:
        return [dict(p) for p in s.scalars(select(Job.params_json).order_by(Job.id))]


def _fmt(kind: str, spec: str = "") -> dict[str, Any]:
    return {"output_format": {"kind": kind, "spec": spec}}


@pytest.mark.parametrize(
    ("args", "stored"),
    [
        (["--json-schema", "{schema}", "--logprobs", "3", "--n", "2"],
         {**_fmt("json_schema", SPEC), "logprobs": 3, "n": 2}),
        (["--json-schema", "{wrapped}"], _fmt("json_schema", SPEC)),
        (["--json-object", "--logprobs", "0"], {**_fmt("json_object"), "logprobs": 0}),
        (["--choice", "yes", "--choice", "no"], _fmt("choice", '["yes","no"]')),
        (["--regex", "[0-9]{3}"], _fmt("regex", "[0-9]{3}")),
    ],
)  # fmt: skip
def test_submit_stores_the_options_in_the_job_params(
    env: dict[str, str], lmjobs_home: Path, tmp_path: Path, args: list[str], stored: dict[str, Any]
) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "wrapped.json").write_text(json.dumps({"name": "label", "schema": SCHEMA, "strict": True}))
    paths = {"schema": tmp_path / "schema.json", "wrapped": tmp_path / "wrapped.json"}
    argv = [_paths(a, paths) for a in args]
    out = cli_json(["submit", str(_file(tmp_path)), "--task", "generate", *argv], env)
    assert out["requests"] == 2
    (params,) = _job_params(lmjobs_home)
    assert {k: params[k] for k in stored} == stored
    for absent in {"output_format", "logprobs", "n"} - set(stored):
        assert absent not in params


SCHEMA_NOT = '{"type": "object", "properties": {"a": {"not": {"type": "string"}}}}'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json-schema", "{bad}"], '--json-schema: {bad}: invalid JSON schema: Unimplemented keys: ["no'),
        (["--json-schema", "{missing}"], "--json-schema: {missing}: no such file"),
        (["--regex", "[a-"], "--regex: invalid regex: regex parse error: unclosed character class"),
        (["--choice", ""], "--choice: a choice must not be an empty string"),
        (["--choice", "a", "--choice", "a"], "--choice: choice 'a' appears twice"),
        (["--json-object", "--regex", "x"], "--json-object and --regex: use at most one output format"),
        (["--logprobs", "21"], "--logprobs must be between 0 and 20"),
        (["--n", "0"], "--n must be between 1 and 128"),
        (["--n", "129"], "--n must be between 1 and 128"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_usage_errors_and_nothing_is_ingested(
    env: dict[str, str], lmjobs_home: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.json").write_text(SCHEMA_NOT)
    paths = {"bad": tmp_path / "bad.json", "missing": tmp_path / "missing.json"}
    argv = [_paths(a, paths) for a in args]
    proc = run_cli(["submit", str(_file(tmp_path)), "--task", "generate", *argv], env)
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {_paths(message, paths)}"), proc.stderr
    assert _job_params(lmjobs_home) == []


def test_run_applies_the_options_to_every_request(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    rows = [
        {"id": "job", "prompt": "alpha beta"},
        {"id": "own", "prompt": "gamma delta", "choices": ["maybe"], "n": 1},  # the line's own
        {"id": "bad", "prompt": "x", "regex": "(?<=a)b"},  # a per-line reject; the others run
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--choice", "yes", "--choice", "no", "--n", "2", "--temperature", "1", "--logprobs", "1"]
    proc = run_cli(["run", str(f), "--task", "generate", *argv], env)
    assert proc.returncode == 0, proc.stderr
    assert "line 3: regex: invalid regex: " in proc.stderr
    job = cli_json(["list"], env)[0]["id"]
    results = run_cli(["results", str(job)], env, check=True).stdout.splitlines()
    answers: dict[str, list[str]] = {}
    for row in map(json.loads, results):
        answers.setdefault(row["custom_id"], []).append(row["output_text"])
    assert sorted(answers) == ["job", "own"]
    assert len(answers["job"]) == 2 and set(answers["job"]) <= {"yes", "no"}
    assert answers["own"] == ["maybe"]


def test_schedule_add_takes_the_same_options(env: dict[str, str], tmp_path: Path) -> None:
    f = _file(tmp_path)
    base = ["schedule", "add", str(f), "--cron", "0 2 * * *", "--task", "generate"]
    proc = run_cli([*base, "--regex", "(?=a)"], env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --regex: invalid regex: "), proc.stderr
    run_cli([*base, "--choice", "a", "--choice", "b", "--logprobs", "2", "--n", "3"], env, check=True)
    (sch,) = cli_json(["schedule", "list"], env)
    params = sch["options"]["params"]
    assert params["output_format"] == {"kind": "choice", "spec": '["a","b"]'}
    assert (params["logprobs"], params["n"]) == (2, 3)
