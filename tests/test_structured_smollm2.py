"""Structured outputs on the real offline model (SmolLM2-135M-Instruct, fp32) through
`lmjobs run`: a file of choice, JSON Schema, regular-expression and JSON-object requests
(native lines and OpenAI lines with ``response_format``) whose answers all parse and
validate, checked independently of the grammar engine that constrained them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from services import cli_env, run_cli

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "structured.jsonl"


def _format_of(line: dict[str, Any]) -> tuple[str, Any]:
    """What the line asks for: (kind, spec) as the user wrote it."""
    if "body" in line:
        rf = line["body"]["response_format"]
        if rf["type"] == "json_schema":
            return "json_schema", rf["json_schema"]["schema"]
        return "json_object", None
    for kind in ("choices", "json_schema", "regex"):
        if kind in line:
            return kind, line[kind]
    assert line.get("json_object") is True
    return "json_object", None


def test_every_structured_answer_of_smollm2_parses_and_validates(tmp_path: Path, lmjobs_home: Path) -> None:
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines()]
    assert {_format_of(line)[0] for line in lines} == {"choices", "json_schema", "regex", "json_object"}
    out = tmp_path / "out.jsonl"
    env = cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_DTYPE="float32")
    args = ["run", str(EXAMPLE), "--task", "qa", "--max-new-tokens", "64", "-o", str(out)]
    proc = run_cli(args, env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == len(lines)
    for line in lines:
        row = rows[line.get("custom_id") or line.get("id")]
        assert row["status"] == "succeeded" and row["finish_reason"] == "stop", row
        assert row["valid"] is True, row
        text = row["output_text"]
        kind, spec = _format_of(line)
        if kind == "choices":
            assert text in spec
        elif kind == "regex":
            assert re.fullmatch(spec, text), text
        else:
            value = json.loads(text)
            assert isinstance(value, dict), text
            if kind == "json_schema":
                jsonschema.validate(value, spec)
