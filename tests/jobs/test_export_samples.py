"""`lmjobs results` of a job with n samples and log-probabilities: every format lists every
sample in line order then sample order; the OpenAI format has one line per request whose
choices are the samples, and validates with the openai client's own types."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from analytics_data import run, submit, write_jsonl
from fake_engine import FakeEngine
from openai.types import Completion
from openai.types.chat import ChatCompletion
from sqlalchemy import select

from lmjobs.db.models import Request, Result
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.batch_output import output_lines
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest
from lmjobs.jobs.export import COLUMNS, write_results

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _line(custom_id: str, url: str, text: str, **body: Any) -> dict[str, Any]:
    content = {"messages": [{"role": "user", "content": text}]} if url == CHAT else {"prompt": text}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", **content, **body}}


LINES = [
    _line("c1", CHAT, "one two three four", n=3, temperature=0.8, logprobs=True, top_logprobs=2),
    _line("g1", COMPLETIONS, "once upon a time", n=2, temperature=0.8, logprobs=2),
    _line("c2", CHAT, "plain question here"),
    _line("c3", CHAT, "please fail me now", n=2, temperature=0.8),
    _line("g2", COMPLETIONS, "greedy twins here", n=2, logprobs=0),
]
SAMPLES = {"c1": 3, "g1": 2, "c2": 1, "c3": 1, "g2": 2}  # rows each: c3 failed (one row)


def _fails_c3(requests: Sequence[GenRequest]) -> list[Generation]:
    out = []
    for g in FakeEngine()(requests):
        req = next(r for r in requests if r.key == g.key)
        if "fail me" in str(req.messages):
            g = Generation(g.key, "", FinishReason.ERROR, 4, 0, 0.0, error="prompt too long", sample_index=0)
        out.append(g)
    return out


def _job(db: Database, tmp_path: Path) -> int:
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", LINES), "chat", model="m", chunk_size=2)
    run(db, job_id, _fails_c3)
    return job_id


def _db_rows(db: Database, job_id: int) -> list[tuple[str, int, str | None, Any]]:
    with db.session() as s:
        return [
            (c, i, t, lp)
            for c, i, t, lp in s.execute(
                select(Request.custom_id, Result.sample_index, Result.output_text, Result.logprobs_json)
                .join(Result, Result.request_id == Request.id)
                .where(Request.job_id == job_id)
                .order_by(Request.line_number, Result.sample_index)
            )
        ]


def test_every_format_lists_every_sample_in_order(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path)
    truth = _db_rows(db, job_id)
    order = [(c, i) for c in SAMPLES for i in range(SAMPLES[c])]
    assert [(c, i) for c, i, _, _ in truth] == order

    out = io.StringIO()
    assert write_results(db, job_id, "jsonl", out) == len(order)
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(r["custom_id"], r["sample_index"], r["output_text"], r["logprobs"]) for r in rows] == truth
    assert [r["line_number"] for r in rows] == [1, 1, 1, 2, 2, 3, 4, 5, 5]
    assert all(r["valid"] is None for r in rows)  # unconstrained
    assert rows[0]["logprobs"] and rows[5]["logprobs"] is None  # asked / not asked
    assert len({r["output_text"] for r in rows[:3]}) == 3  # sampled
    assert rows[7]["output_text"] == rows[8]["output_text"]  # greedy

    out = io.StringIO()
    write_results(db, job_id, "csv", out)
    reader = csv.DictReader(io.StringIO(out.getvalue(), newline=""))
    assert reader.fieldnames == COLUMNS and "sample_index" in COLUMNS and "valid" in COLUMNS
    got = [(r["custom_id"], int(r["sample_index"]), r["output_text"] or None) for r in reader]
    assert got == [(c, i, t) for c, i, t, _ in truth]

    buf = io.BytesIO()
    write_results(db, job_id, "parquet", buf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert table.column_names == COLUMNS
    d = table.to_pydict()
    assert list(zip(d["custom_id"], d["sample_index"], d["output_text"], strict=True)) == [
        (c, i, t) for c, i, t, _ in truth
    ]


def _check_chat(body: dict[str, Any], truth: list[tuple[str, int, str | None, Any]]) -> None:
    chat = ChatCompletion.model_validate(body)
    assert [c.index for c in chat.choices] == [i for _, i, _, _ in truth]
    assert [c.message.content for c in chat.choices] == [t for _, _, t, _ in truth]
    for choice, (_, _, _, lp) in zip(chat.choices, truth, strict=True):
        if lp is None:
            assert choice.logprobs is None
            continue
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert [t.model_dump() for t in choice.logprobs.content] == lp
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def _check_completion(body: dict[str, Any], truth: list[tuple[str, int, str | None, Any]], k: int) -> None:
    comp = Completion.model_validate(body)
    assert comp.object == "text_completion"
    assert [c.index for c in comp.choices] == [i for _, i, _, _ in truth]
    for choice, (_, _, text, lp) in zip(comp.choices, truth, strict=True):
        assert choice.text == text and choice.logprobs is not None
        lps = choice.logprobs
        assert lps.tokens and "".join(lps.tokens) == text
        assert lps.token_logprobs == [t["logprob"] for t in lp]
        assert lps.text_offset == [len("".join(lps.tokens[:i])) for i in range(len(lps.tokens))]
        assert lps.top_logprobs is not None and all(len(top) == k for top in lps.top_logprobs)
        if k:
            assert lps.top_logprobs[0][lps.tokens[0]] == lps.token_logprobs[0]


def test_openai_format_has_one_line_per_request_with_every_sample(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path)
    truth = _db_rows(db, job_id)
    of = {c: [t for t in truth if t[0] == c] for c in SAMPLES}
    with db.session() as s:
        tokens = {
            c: (int(i or 0), int(o or 0))
            for c, i, o in s.execute(
                select(Request.custom_id, Result.input_tokens, Result.output_tokens)
                .join(Result, Result.request_id == Request.id)
                .where(Request.job_id == job_id, Result.sample_index == 0)
            )
        }
        out_sum: dict[str, int] = {}
        for c, o in s.execute(
            select(Request.custom_id, Result.output_tokens)
            .join(Result, Result.request_id == Request.id)
            .where(Request.job_id == job_id)
        ):
            out_sum[c] = out_sum.get(c, 0) + int(o or 0)

    out = io.StringIO()
    assert write_results(db, job_id, "openai", out) == len(SAMPLES)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["custom_id"] for x in lines] == list(SAMPLES)
    by_id = {x["custom_id"]: x for x in lines}
    _check_chat(by_id["c1"]["response"]["body"], of["c1"])
    _check_chat(by_id["c2"]["response"]["body"], of["c2"])
    _check_completion(by_id["g1"]["response"]["body"], of["g1"], 2)
    _check_completion(by_id["g2"]["response"]["body"], of["g2"], 0)
    assert by_id["c3"]["response"] is None
    assert by_id["c3"]["error"] == {"code": "generation_failed", "message": "prompt too long"}
    for c in ("c1", "g1", "c2", "g2"):
        usage = by_id[c]["response"]["body"]["usage"]
        assert usage["prompt_tokens"] == tokens[c][0]  # the prompt once
        assert usage["completion_tokens"] == out_sum[c]  # every sample
        assert usage["total_tokens"] == tokens[c][0] + out_sum[c]

    # lmjobs serve's batch output files use the same body builder
    batch = list(output_lines(db, job_id, endpoint=CHAT, model="m", unfinished_code=None))
    assert [ok for ok, _ in batch] == [True, True, True, False, True]
    first = json.loads(batch[0][1])
    assert first["custom_id"] == "c1"
    assert first["response"]["body"]["choices"] == by_id["c1"]["response"]["body"]["choices"]
