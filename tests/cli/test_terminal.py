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
