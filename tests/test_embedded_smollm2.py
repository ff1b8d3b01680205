"""`lmjobs run` on the embedded default (SQLite, no Redis) with the real offline model
SmolLM2-135M-Instruct: sensible, deterministic text for summarize and qa."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from services import cli_env, run_cli

pytestmark = pytest.mark.slow

SUMMARIZE = [
    {
        "id": "s1",
        "text": "The city council voted on Tuesday to build a new public library downtown. "
        "Construction starts next spring and the library should open in two years.",
    },
    {
        "id": "s2",
        "text": "Bees pollinate many crops. Farmers worry because bee populations have "
        "fallen in recent years, which could reduce harvests of fruit and nuts.",
    },
    {
        "id": "s3",
        "text": "The new phone has a bigger battery and a better camera, but it costs "
        "two hundred dollars more than last year's model.",
    },
]
QA = [
    {"id": "q1", "question": "What is the capital of France?"},
    {
        "id": "q2",
        "question": "How many legs does a spider have?",
        "context": "Spiders are arachnids with eight legs.",
    },
    {"id": "q3", "question": "What color is the sky on a clear day?"},
]


def _run(task: str, rows: list[dict], tmp_path: Path, env: dict[str, str], tag: str) -> list[dict]:
    src = tmp_path / f"{task}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"{task}-{tag}.jsonl"
    proc = run_cli(
        ["run", str(src), "--task", task, "--max-new-tokens", "40", "-o", str(out)],
        env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in out.read_text().splitlines()]


@pytest.mark.parametrize("task,rows", [("summarize", SUMMARIZE), ("qa", QA)])
def test_smollm2_embedded_run(task: str, rows: list[dict], tmp_path: Path, lmjobs_home: Path) -> None:
    env = cli_env(LMJOBS_HOME=str(lmjobs_home))  # nothing else: the embedded default
    assert "LMJOBS_DATABASE_URL" not in env and "LMJOBS_MODEL" not in env
    first = _run(task, rows, tmp_path, env, "a")
    assert [r["custom_id"] for r in first] == [r["id"] for r in rows]
    for r in first:
        assert r["status"] == "succeeded", r
        text = r["output_text"]
        assert isinstance(text, str) and len(text.strip()) >= 2
        assert sum(c.isalpha() for c in text) >= 0.5 * len(text.strip())  # words, not noise
        assert r["model"] == "smollm2-135m" and r["model_revision"]
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["output_tokens"] <= 40 and r["input_tokens"] > 5
        assert r["template_version"].startswith(task + "/")
    # greedy decoding is deterministic: a second job gives the same text
    second = _run(task, rows, tmp_path, env, "b")
    assert [r["output_text"] for r in second] == [r["output_text"] for r in first]
    assert (lmjobs_home / "lmjobs.db").exists()
    if task == "qa":
        answers = {r["custom_id"]: r["output_text"].lower() for r in first}
        assert "paris" in answers["q1"]
        assert "eight" in answers["q2"] or "8" in answers["q2"]
