"""The analytics commands as a person runs them: `report`, `schedule`, `submit --dry-run`."""

from __future__ import annotations

import json
from pathlib import Path

from analytics_data import submit_and_run, translate_rows, write_jsonl
from services import cli_env, cli_json, run_cli

from lmjobs.db.session import get_database


def test_report_command(sqlite_url: str, tmp_path: Path) -> None:
    job_id = submit_and_run(
        get_database(sqlite_url), write_jsonl(tmp_path / "in.jsonl", translate_rows(9)), "translate"
    )
    env = cli_env(LMJOBS_DATABASE_URL=sqlite_url)
    page = tmp_path / "report.html"
    rep = cli_json(["report", str(job_id), "--html", str(page)], env)
    assert rep["job_id"] == job_id and rep["totals"]["succeeded"] == 9
    assert set(rep["scores"]) == {"bleu", "chrf"} and "corpus_bleu" in rep["corpus_scores"]
    assert '<svg id="throughput"' in page.read_text()

    text = run_cli(["report"], env, check=True).stdout  # the latest job, as tables
    assert f"job {job_id}" in text and "corpus_chrf" in text and "by task" in text
    again = run_cli(["report", str(job_id), "--html", str(page)], env)
    assert again.returncode == 1 and "--force" in again.stderr
    missing = run_cli(["report", "999"], env)
    assert missing.returncode == 1 and "no job 999" in missing.stderr
    assert "Traceback" not in again.stderr + missing.stderr


def test_schedule_commands(sqlite_url: str, tmp_path: Path) -> None:
    env = cli_env(LMJOBS_DATABASE_URL=sqlite_url)
    path = write_jsonl(tmp_path / "in.jsonl", translate_rows(2))
    added = cli_json(
        [
            "schedule",
            "add",
            str(path),
            "--cron",
            "30 1 * * *",
            "--task",
            "translate",
            "--model",
            "fake",
            "--tz",
            "UTC",
            "--finish-within",
            "1h30m",
            "--max-new-tokens",
            "32",
        ],
        env,
    )
    assert added["next_run_at"].endswith("01:30:00+00:00") and added["timezone"] == "UTC"
    assert added["options"]["finish_within_s"] == 5400
    assert added["options"]["params"]["max_new_tokens"] == 32
    (listed,) = cli_json(["schedule", "list"], env)
    assert listed["id"] == added["id"]
    bad = run_cli(["schedule", "add", str(path), "--cron", "every night", "--task", "qa"], env)
    assert bad.returncode == 1 and "cron" in bad.stderr and "Traceback" not in bad.stderr
    cli_json(["schedule", "remove", str(added["id"])], env)
    assert cli_json(["schedule", "list"], env) == []


def test_dry_run_with_a_real_tokenizer_writes_nothing(tmp_path: Path) -> None:
    from tiny_models import build_tiny_causal

    model = build_tiny_causal(tmp_path / "tiny")
    home = tmp_path / "fresh-home"
    env = cli_env(LMJOBS_HOME=str(home))
    rows = [*translate_rows(5), translate_rows(1)[0], "{bad"]  # a duplicate id, a bad line
    rows.append({"id": "long", "text": "word " * 600, "target_lang": "de"})  # over 512 tokens
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    proc = run_cli(
        [
            "submit",
            str(path),
            "--task",
            "translate",
            "--model",
            str(model),
            "--max-new-tokens",
            "16",
            "--dry-run",
            "--json",
        ],
        env,
        check=True,
    )
    est = json.loads(proc.stdout)
    assert (est["lines"], est["accepted"], est["rejected"], est["duplicate_ids"]) == (8, 6, 2, 1)
    assert est["submitted"] is False and est["tokens_guessed"] is False
    assert est["context_length"] == 512 and est["over_context"] == 1
    assert est["max_new_tokens_total"] == 6 * 16 and est["tokens_in"] > 600
    assert est["throughput_basis"].startswith("guess")
    assert not home.exists()  # no database, no folder: nothing written

    guess = run_cli(
        ["submit", str(path), "--task", "translate", "--model", "not/a/model/here", "--dry-run"],
        env,
        check=True,
    )
    assert "guess: chars / 4" in guess.stdout and not home.exists()
