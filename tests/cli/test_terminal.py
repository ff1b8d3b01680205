"""Tables fit an 80-column terminal: long model paths are shortened, never folded letter by
letter; --json is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from fake_engine import FAKE_ENGINE
from services import cli_env, cli_json, run_cli

MODEL = "/srv/models/cache/organisation-name/Qwen2.5-0.5B-Instruct-finetuned-for-invoices"


def test_list_and_status_fit_80_columns(lmjobs_home: Path, tmp_path: Path) -> None:
    env = cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_TEST_ENGINE=FAKE_ENGINE)
    env["COLUMNS"] = "80"
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "a b c"}) + "\n")
    run_cli(["run", str(f), "--task", "generate", "--model", MODEL], env, check=True)

    for args in (["list"], ["status"]):
        text = run_cli(args, env, check=True).stdout
        lines = text.splitlines()
        assert all(len(x) <= 80 for x in lines), text
        assert "completed" in text and "generate" in text, text
        # the end of the path survives, on one line, cut at the front with an ellipsis
        assert any("…" in x and "invoices" in x for x in lines), text
        assert not any(x.strip(" │") in ("i", "n", "v") for x in lines), text  # no letter folding

    assert cli_json(["list"], env)[0]["model"] == MODEL  # --json keeps the full value


def test_submit_shows_a_progress_bar_on_a_terminal_and_none_on_a_pipe(
    lmjobs_home: Path, tmp_path: Path
) -> None:
    """Bytes of the file, lines read (rejected ones included), lines/s and lines rejected so
    far on stderr when it is a terminal (rich's ``TTY_COMPATIBLE=1`` makes the captured
    stderr one); nothing on a pipe; --json's stdout the same either way."""
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"line {i}"}) + "\n" for i in range(200)) + "{oops\n")
    env = cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_TEST_ENGINE=FAKE_ENGINE, LMJOBS_BROKER_URL="memory://")
    args = ["submit", str(f), "--task", "generate", "--json", "--yes"]

    piped = run_cli(args, env, check=True)
    assert "submitting" not in piped.stderr and "lines/s" not in piped.stderr, piped.stderr

    tty = run_cli(args, {**env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}, check=True)
    assert "submitting" in tty.stderr, tty.stderr
    assert "201 lines" in tty.stderr and "lines/s" in tty.stderr and "1 rejected" in tty.stderr, tty.stderr
    for proc in (piped, tty):
        out = json.loads(proc.stdout)
        assert (out["requests"], out["rejected"]) == (200, 1), proc.stdout
