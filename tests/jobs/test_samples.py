"""n samples, log-probabilities and output formats, from the engine to the results table:
one row per request and sample, recorded whole or not at all, exactly once, with counts of
requests (not samples), through dedup, isolation, resumes and engine faults; and the report's
valid share and choice labels."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from analytics_data import FAKE_CTX, run, submit, write_jsonl
from fake_engine import FakeEngine
from services import cli_env, run_cli
from sqlalchemy import select, update

from lmjobs.cli.report_html import render_html
from lmjobs.db.models import Chunk, Job, Request, Result, utcnow
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.chunks import ChunkOutcome, process_chunk
from lmjobs.jobs.control import job_status
from lmjobs.jobs.engine_api import (
    FinishReason,
    GenerateFn,
    Generation,
    GenRequest,
    OutputFormat,
    SamplingParams,
)
from lmjobs.jobs.lifecycle import start_due_jobs
from lmjobs.jobs.report import build_report

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog"]},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "count"],
}
CHOICES = ["positive", "negative", "neutral"]


def set_params(
    db: Database, job_id: int, params: dict[str, Any], *, lines: Sequence[int] | None = None
) -> None:
    """What the input side writes for a line that asks for these (SamplingParams.to_dict keys)."""
    with db.session() as s:
        reqs = s.scalars(select(Request).where(Request.job_id == job_id)).all()
        for r in reqs:
            if lines is None or r.line_number in lines:
                s.execute(
                    update(Request)
                    .where(Request.id == r.id)
                    .values(params_json={**(r.params_json or {}), **params})
                )


def prompts(n: int, tag: str = "alpha beta gamma") -> list[dict[str, str]]:
    return [{"id": f"p{i}", "prompt": f"{tag} {i}"} for i in range(n)]


def job_with(
    db: Database, tmp_path: Path, params: dict[str, Any], *, n_lines: int = 5, chunk_size: int = 2
) -> int:
    job_id = submit(
        db, write_jsonl(tmp_path / "in.jsonl", prompts(n_lines)), "generate", chunk_size=chunk_size
    )
    set_params(db, job_id, params)
    return job_id


def result_rows(db: Database, job_id: int) -> list[Result]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Result)
                .join(Request, Request.id == Result.request_id)
                .where(Result.job_id == job_id)
                .order_by(Request.line_number, Result.sample_index)
            )
        )


def past_the_attempt_cap(db: Database, chunk_id: int) -> None:
    """The chunk already crashed its worker once: with max_attempts=1 its next claim is isolated."""
    with db.session() as s:
        s.execute(update(Chunk).where(Chunk.id == chunk_id).values(attempts=1))


def chunk_ids(db: Database, job_id: int) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)))


def by_request(rows: Sequence[Result]) -> dict[int, list[Result]]:
    out: dict[int, list[Result]] = {}
    for r in rows:
        out.setdefault(r.request_id, []).append(r)
    return out


def test_n_samples_are_rows_with_logprobs_and_counts_are_requests(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = job_with(db, tmp_path, {"n": 3, "temperature": 0.7, "seed": 5, "logprobs": 2})
    run(db, job_id)
    rows = result_rows(db, job_id)
    assert len(rows) == 15
    for samples in by_request(rows).values():
        assert [r.sample_index for r in samples] == [0, 1, 2]
        assert len({r.output_text for r in samples}) == 3  # sampled: three different answers
        for r in samples:
            assert r.status == "succeeded" and r.valid is None and r.params_json["n"] == 3
            lp = r.logprobs_json
            assert lp is not None and len(lp) == r.output_tokens > 0
            assert "".join(t["token"] for t in lp) == r.output_text
            for t in lp:
                tops = [c["logprob"] for c in t["top_logprobs"]]
                assert len(tops) == 2 and tops == sorted(tops, reverse=True) and t["logprob"] <= 0
                assert bytes(t["bytes"]).decode() == t["token"]
    st = job_status(db, job_id)  # requests, not samples
    assert (st.succeeded, st.failed, st.pending, st.status) == (5, 0, 0, "completed")
    rep = build_report(db, job_id)
    assert (rep.totals.requests, rep.totals.succeeded) == (5, 5)
    assert rep.structured is None  # nothing constrained


def test_greedy_samples_are_identical_and_logprobs_only_when_asked(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = job_with(db, tmp_path, {"n": 2}, n_lines=3)
    run(db, job_id)
    rows = result_rows(db, job_id)
    assert len(rows) == 6 and all(r.logprobs_json is None for r in rows)
    for samples in by_request(rows).values():
        assert samples[0].output_text == samples[1].output_text


class _Died(BaseException):
    """The worker process dying mid-chunk (not an exception the chunk service handles)."""


def test_a_resumed_chunk_records_no_sample_twice(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = job_with(db, tmp_path, {"n": 2, "temperature": 1.0, "logprobs": 1}, n_lines=4, chunk_size=4)
    start_due_jobs(db, utcnow())
    (chunk,) = chunk_ids(db, job_id)
    calls = tmp_path / "calls.txt"
    engine = FakeEngine(calls_file=str(calls))
    seen: list[int] = []

    def dies_on_the_third(reqs: Sequence[GenRequest]) -> list[Generation]:
        seen.append(reqs[0].key)
        if len(seen) == 3:
            raise _Died()
        return engine(reqs)

    # Isolated mode commits request by request: two requests are recorded, then the worker dies.
    past_the_attempt_cap(db, chunk)
    dying = dataclasses.replace(FAKE_CTX, max_attempts=1, lease_seconds=0)
    with pytest.raises(_Died):
        process_chunk(db, chunk, generate=dies_on_the_third, ctx=dying)
    assert len(result_rows(db, job_id)) == 4  # two requests, both samples each

    calls.write_text("")
    outcome = process_chunk(db, chunk, generate=engine, ctx=FAKE_CTX)  # the lease expired: resumed
    assert outcome.claimed and outcome.skipped == 2 and outcome.generated == 2
    assert (outcome.succeeded, outcome.failed) == (2, 0)
    assert len(calls.read_text().split()) == 2  # only the two without results ran
    rows = result_rows(db, job_id)
    keys = [(r.request_id, r.sample_index) for r in rows]
    assert len(rows) == 8 and len(set(keys)) == 8
    assert all(r.logprobs_json for r in rows)
    again = process_chunk(db, chunk, generate=engine, ctx=FAKE_CTX)  # a second delivery
    assert not again.claimed and len(result_rows(db, job_id)) == 8
    assert job_status(db, job_id).succeeded == 4


def _broken(requests: Sequence[GenRequest]) -> list[Generation]:
    """Line 1: sample 2 missing; line 2: sample 1 failed; line 3: no log-probabilities although
    asked; line 4: no validity verdict for its format; line 5: fine."""
    out = []
    for g in FakeEngine()(requests):
        line = g.key - requests[0].key + 1
        if line == 1 and g.sample_index == 2:
            continue
        if line == 2 and g.sample_index == 1:
            g = Generation(
                g.key, "", FinishReason.ERROR, 3, 0, 0.0, error="RuntimeError: boom", sample_index=1
            )
        if line == 3:
            g.logprobs = None
        if line == 4:
            g.valid = None
        out.append(g)
    return out


def test_a_missing_or_failed_sample_fails_its_request_alone(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = job_with(db, tmp_path, {"n": 3, "temperature": 1.0, "logprobs": 0}, chunk_size=5)
    set_params(db, job_id, {"output_format": {"kind": "choice", "spec": json.dumps(CHOICES)}}, lines=[4, 5])
    start_due_jobs(db, utcnow())
    (chunk,) = chunk_ids(db, job_id)
    outcome = process_chunk(db, chunk, generate=_broken, ctx=FAKE_CTX)
    assert (outcome.succeeded, outcome.failed, outcome.engine_fault) == (1, 4, None)
    groups = list(by_request(result_rows(db, job_id)).values())
    errors = []
    for samples in groups[:4]:  # one failed row each, sample 0: never a partial set
        assert [(r.sample_index, r.status, r.output_text, r.logprobs_json) for r in samples] == [
            (0, "failed", None, None)
        ]
        errors.append(samples[0].error)
    assert errors == [
        "the engine returned 2 of 3 samples for this request (missing: 2)",
        "RuntimeError: boom",
        "the engine returned no log-probabilities for this request, which asked for them",
        "the engine did not check the answer against its choice format",
    ]
    fine = groups[4]
    assert [r.sample_index for r in fine] == [0, 1, 2] and all(r.valid is True for r in fine)
    assert {r.output_text for r in fine} <= set(CHOICES)
    st = job_status(db, job_id)
    assert (st.succeeded, st.failed) == (1, 4)


def test_an_engine_fault_on_every_sample_stops_the_job(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = job_with(db, tmp_path, {"n": 3, "temperature": 1.0}, n_lines=2, chunk_size=2)
    start_due_jobs(db, utcnow())
    (chunk,) = chunk_ids(db, job_id)
    fault = "AttributeError: 'DynamicLayer' object has no attribute 'dtype'"
    outcome = process_chunk(db, chunk, generate=FakeEngine(fault=fault), ctx=FAKE_CTX)
    assert outcome.engine_fault == fault
    assert result_rows(db, job_id) == []  # no row blames the data
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and fault in (job.error or "")


def test_isolated_requests_record_every_sample(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = job_with(db, tmp_path, {"n": 2, "temperature": 1.0, "logprobs": 3}, n_lines=3, chunk_size=3)
    start_due_jobs(db, utcnow())
    (chunk,) = chunk_ids(db, job_id)
    past_the_attempt_cap(db, chunk)
    outcome = process_chunk(
        db, chunk, generate=FakeEngine(), ctx=dataclasses.replace(FAKE_CTX, max_attempts=1)
    )
    assert (outcome.isolated_succeeded, outcome.isolated_failed, outcome.succeeded) == (3, 0, 3)
    rows = result_rows(db, job_id)
    assert [r.sample_index for r in rows] == [0, 1] * 3
    assert all(len(t["top_logprobs"]) == 3 for r in rows for t in r.logprobs_json or [])


def test_dedup_copies_every_sample(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    same = [{"id": f"s{i}", "prompt": "the same prompt again"} for i in range(3)]
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", same), "generate", chunk_size=1)
    set_params(db, job_id, {"n": 2, "logprobs": 1})  # greedy
    calls = tmp_path / "calls.txt"
    run(db, job_id, FakeEngine(calls_file=str(calls)))
    assert len(calls.read_text().split()) == 1  # generated once, copied twice
    groups = list(by_request(result_rows(db, job_id)).values())
    assert [len(g) for g in groups] == [2, 2, 2]
    first = [(r.output_text, r.logprobs_json, r.sample_index) for r in groups[0]]
    for g in groups[1:]:
        assert all(r.deduplicated for r in g)
        assert [(r.output_text, r.logprobs_json, r.sample_index) for r in g] == first
    assert job_status(db, job_id).succeeded == 3


def _structured_job(db: Database, tmp_path: Path) -> int:
    """Lines 1-6: a choice, 2 samples each; 7-8: a JSON schema that fits; 9-10: one cut short."""
    job_id = submit(
        db, write_jsonl(tmp_path / "in.jsonl", prompts(10, "how was it")), "generate", chunk_size=4
    )
    choice = {"kind": "choice", "spec": json.dumps(CHOICES)}
    set_params(db, job_id, {"output_format": choice, "n": 2, "temperature": 1.0}, lines=range(1, 7))
    schema = {"kind": "json_schema", "spec": json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))}
    set_params(db, job_id, {"output_format": schema}, lines=[7, 8])
    set_params(db, job_id, {"output_format": schema, "max_new_tokens": 2}, lines=[9, 10])
    run(db, job_id)
    return job_id


def test_structured_answers_are_recorded_and_reported(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _structured_job(db, tmp_path)
    rows = result_rows(db, job_id)
    assert len(rows) == 16 and all(r.status == "succeeded" for r in rows)
    choice_rows, fits, cut = rows[:12], rows[12:14], rows[14:]
    assert all(r.valid is True and r.output_text in CHOICES for r in choice_rows)
    for r in fits:
        answer = json.loads(r.output_text or "")
        assert r.valid is True and r.finish_reason == "stop" and answer["label"] in ("cat", "dog")
    for r in cut:
        assert r.valid is False and r.finish_reason == "length" and r.output_tokens == 2
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.output_text or "")
    labels = Counter(r.output_text for r in choice_rows)
    assert len(labels) > 1

    rep = build_report(db, job_id)
    assert rep.structured is not None
    assert (rep.structured.answers, rep.structured.valid) == (16, 14)
    assert rep.structured.valid_share == pytest.approx(14 / 16)
    assert dict(rep.structured.labels) == dict(labels)
    assert [n for _, n in rep.structured.labels] == sorted(labels.values(), reverse=True)
    as_json = rep.to_json()["structured"]
    assert as_json["valid"] == 14 and dict(map(tuple, as_json["labels"])) == dict(labels)

    html = render_html(rep, generated_at=utcnow())
    assert 'id="structured"' in html and "14 of 16 valid (87.5%)" in html
    assert all(f"<td>{label}</td><td>{n}</td>" in html for label, n in labels.items())

    env = cli_env(LMJOBS_DATABASE_URL=db_url)
    text = run_cli(["report", str(job_id)], env, check=True).stdout
    assert "valid answers" in text and "14 of 16 (87.5%)" in text and "choice labels" in text
    assert all(label in text for label in labels)
    cli = json.loads(run_cli(["report", str(job_id), "--json"], env, check=True).stdout)
    assert cli["structured"]["valid_share"] == pytest.approx(0.875)


def test_the_fake_engine_refuses_what_it_cannot_build() -> None:
    """A format the fake cannot answer fails its request clearly, as a real refusal would."""
    engine: GenerateFn = FakeEngine()
    hard = OutputFormat("json_schema", json.dumps({"anyOf": [{"type": "string"}]}))
    (g,) = engine([GenRequest(key=1, prompt="x", params=SamplingParams(output_format=hard))])
    assert g.finish_reason is FinishReason.ERROR and g.error and "anyOf" in g.error
    regex = OutputFormat("regex", r"[A-Z]{3}-\d{2}")
    (g,) = engine([GenRequest(key=1, prompt="x", params=SamplingParams(output_format=regex))])
    assert g.valid is True and g.text == "AAA-77"


def test_outcome_counts_requests(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = job_with(db, tmp_path, {"n": 4, "temperature": 1.0}, n_lines=3, chunk_size=3)
    start_due_jobs(db, utcnow())
    (chunk,) = chunk_ids(db, job_id)
    outcome: ChunkOutcome = process_chunk(db, chunk, generate=FakeEngine(), ctx=FAKE_CTX)
    assert (outcome.generated, outcome.succeeded, outcome.failed) == (3, 3, 0)
    assert len(result_rows(db, job_id)) == 12
