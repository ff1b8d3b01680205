"""A file with many bad lines of every kind through the embedded `lmjobs run` (SQLite, the
fake engine): every bad line is reported with its line number, every good line runs.
Then `lmjobs results -o` refuses to overwrite the file it wrote unless --force."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from fake_engine import FAKE_ENGINE
from faultkit import figure
from services import cli_env, cli_json, run_cli

pytestmark = [pytest.mark.slow]

N_GOOD = 1000
REPEAT = 20  # each kind of bad line, scattered through the file

BAD_KINDS: dict[str, bytes] = {
    "not json": b"{not json",
    "truncated": b'{"prompt": "a"',
    "trailing garbage": b'{"prompt": "a"} x',
    "blank": b"",
    "spaces": b"   \t ",
    "array": b'["a", "list"]',
    "string": b'"just a string"',
    "number": b"42",
    "null": b"null",
    "wrong type": b'{"prompt": 12}',
    "missing field": b'{"text": "no prompt for generate"}',
    "NaN": b'{"prompt": "a", "temperature": NaN}',
    "Infinity": b'{"prompt": "a", "top_p": Infinity}',
    "overflow": b'{"prompt": "a", "temperature": 1e999}',
    "duplicate key": b'{"prompt": "a", "prompt": "b"}',
    "invalid utf-8": b'{"prompt": "caf\xe9"}',
    "lone surrogate": b'{"prompt": "a\\ud800b"}',
    "NUL": b'{"prompt": "a\\u0000b"}',
    "deep nesting": b'{"prompt": "a", "metadata": ' + b"[" * 200 + b"]" * 200 + b"}",
    "huge integer": b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
    "BOM mid-file": b'\xef\xbb\xbf{"prompt": "a"}',
    "zero max tokens": b'{"prompt": "a", "max_new_tokens": 0}',
    "negative temperature": b'{"prompt": "a", "temperature": -1}',
}
LONG_LINE = b'{"prompt": "' + b"x" * 1_100_000 + b'"}'  # over the 1 MB line limit


def _write(path: Path) -> tuple[set[int], set[int], dict[int, str]]:
    """Returns (good line numbers, bad line numbers, kind of each bad line)."""
    rng = random.Random(7)
    items: list[tuple[str, bytes]] = [("good", b"")] * N_GOOD
    items += [(k, v) for k, v in BAD_KINDS.items() for _ in range(REPEAT)]
    items += [("long line", LONG_LINE)] * 2
    items += [("duplicate id", b"")] * REPEAT
    rng.shuffle(items)
    good, bad, kinds = set(), set(), {}
    with open(path, "wb") as fh:
        g = 0
        for line_no, (kind, raw) in enumerate(items, start=1):
            if kind == "good":
                raw = json.dumps({"id": f"g{g}", "prompt": f"alpha beta {g}"}).encode()
                g += 1
                good.add(line_no)
            else:
                if kind == "duplicate id":  # the id of a good line written earlier (or later)
                    raw = json.dumps({"id": f"g{rng.randrange(N_GOOD)}", "prompt": "dup"}).encode()
                bad.add(line_no)
                kinds[line_no] = kind
            fh.write(raw + b"\n")
    return good, bad, kinds


def test_every_bad_line_is_reported_and_every_good_line_runs(tmp_path: Path, lmjobs_home: Path) -> None:
    src = tmp_path / "messy.jsonl"
    good, bad, kinds = _write(src)
    env = cli_env(
        LMJOBS_HOME=str(lmjobs_home),
        LMJOBS_TEST_ENGINE=FAKE_ENGINE,
        LMJOBS_MODEL="fake-model",
        LMJOBS_CHUNK_SIZE="100",
    )
    proc = run_cli(["run", str(src), "--task", "generate", "--json"], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = json.loads(proc.stdout)
    job_id = st["id"]
    rejects = cli_json(["rejects", str(job_id)], env)
    reported = {r["line_number"]: r["reason"] for r in rejects}

    # a duplicate id is bad only if its twin came first; otherwise the twin is the repeat
    exported = run_cli(["results", str(job_id)], env, check=True).stdout
    results = [json.loads(x) for x in exported.splitlines()]
    ran = {r["line_number"] for r in results}
    assert all(r["status"] == "succeeded" for r in results)
    swapped = {n for n in bad if kinds[n] == "duplicate id" and n in ran}
    expected_bad = (bad - swapped) | (good - ran)
    assert all(kinds.get(n) == "duplicate id" or n not in kinds for n in good - ran)
    missing = sorted(set(expected_bad) - set(reported))
    assert not missing, [(n, kinds.get(n)) for n in missing[:10]]
    assert set(reported) == expected_bad
    assert ran == (good | bad) - expected_bad
    assert st["lines_rejected"] == len(expected_bad)
    assert st["status"] == "completed" and st["succeeded"] == len(ran) and st["pending"] == 0
    # the first reports are on stderr with their line numbers, the rest behind `lmjobs rejects`
    first = sorted(expected_bad)[:20]
    assert all(f"line {n}:" in proc.stderr for n in first)
    assert f"lmjobs rejects {job_id}" in proc.stderr
    assert all(reason for reason in reported.values())
    figure(
        f"bad lines: {len(expected_bad)} bad lines of {len(BAD_KINDS) + 2} kinds among "
        f"{len(good) + len(bad)} through `lmjobs run`: every one reported with its line number, "
        f"all {len(ran)} good lines ran"
    )

    # results -o never overwrites without --force
    out = tmp_path / "results.jsonl"
    run_cli(["results", str(job_id), "-o", str(out)], env, check=True)
    out.write_text("precious\n")
    refused = run_cli(["results", str(job_id), "-o", str(out)], env)
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert out.read_text() == "precious\n"
    run_cli(["results", str(job_id), "-o", str(out), "--force"], env, check=True)
    assert len(out.read_text().splitlines()) == len(ran)
