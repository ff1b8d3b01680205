"""`lmjobs report`: figures equal the database, and the HTML page parses with its plots."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from analytics_data import run, submit, translate_rows, write_jsonl
from fake_engine import FakeEngine
from services import cli_env, run_cli
from sqlalchemy import select, update

from lmjobs.cli.report_html import render_html
from lmjobs.db.example_queries import EXAMPLES
from lmjobs.db.models import Chunk, Job, Request, Result, Score
from lmjobs.db.readonly import run_readonly_query
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest
from lmjobs.jobs.metrics import mean_scores, score_job
from lmjobs.jobs.report import LATENCY_BINS, SCORE_BINS, JobReport, build_report, percentile

N = 40
EVIL = "<script>alert('x')</script> & out of memory"


def _engine(requests: Sequence[GenRequest]) -> list[Generation]:
    """Latency grows with the key; every 7th fails (two reasons, one with markup in it)."""
    out = []
    for g in FakeEngine()(requests):
        if g.key % 7 == 0:
            reason = EVIL if g.key % 2 else "prompt too long"
            out.append(
                Generation(
                    key=g.key,
                    text="",
                    finish_reason=FinishReason.ERROR,
                    input_tokens=0,
                    output_tokens=0,
                    latency_ms=0.0,
                    error=reason,
                )
            )
        else:
            out.append(
                Generation(
                    key=g.key,
                    text=g.text,
                    finish_reason=g.finish_reason,
                    input_tokens=g.input_tokens,
                    output_tokens=g.output_tokens,
                    latency_ms=float(g.key * 13 % 97) + 0.5,
                )
            )
    return out


def _job(db: Database, tmp_path: Path) -> int:
    rows = translate_rows(N + 2)
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", [*rows[:N], "oops"]), "translate", chunk_size=6)
    run(db, job_id, _engine)
    with db.session() as s:  # spread the results over 10 minutes, 15 s apart
        start = s.scalar(select(Job.started_at).where(Job.id == job_id))
        assert start is not None
        ids = list(s.scalars(select(Result.id).where(Result.job_id == job_id).order_by(Result.id)))
        for i, rid in enumerate(ids):
            s.execute(
                update(Result)
                .where(Result.id == rid)
                .values(created_at=start + timedelta(seconds=15 * (i + 1)))
            )
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(finished_at=start + timedelta(seconds=15 * (len(ids) + 1)))
        )
    score_job(db, job_id)
    return job_id


def test_figures_equal_the_database(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path)
    rep = build_report(db, job_id)
    with db.session() as s:
        res = s.execute(
            select(Result.status, Result.error, Result.latency_ms, Result.output_tokens).where(
                Result.job_id == job_id
            )
        ).all()
    ok = [r for r in res if r.status == "succeeded"]
    t = rep.totals
    assert (t.requests, t.succeeded, t.failed, t.pending) == (N, len(ok), N - len(ok), 0)
    assert t.output_tokens == sum(r.output_tokens for r in res)
    assert rep.lines_rejected == 1 and [f.task for f in rep.per_task] == ["translate"]
    lat = sorted(r.latency_ms for r in ok)
    assert t.latency_ms.p50 == percentile(lat, 0.5) == lat[(len(lat) + 1) // 2 - 1]
    assert t.latency_ms.p99 == lat[-1] and t.latency_ms.max == lat[-1]
    sql = {title: q for title, _, q in EXAMPLES}["Latency percentiles"]
    with run_readonly_query(db_url, sql) as q:  # the documented SQL agrees with Python
        p50, p90, p99, _, n = next(iter(q.rows))
    assert (p50, p90, p99, n) == (t.latency_ms.p50, t.latency_ms.p90, t.latency_ms.p99, len(ok))

    assert dict(rep.failures) == dict(Counter(r.error for r in res if r.status == "failed"))
    assert sum(b.requests for b in rep.throughput) == N
    assert sum(b.output_tokens for b in rep.throughput) == t.output_tokens
    assert rep.bucket_s == 15 and 40 <= len(rep.throughput) <= 42  # 10 min in 15 s buckets
    assert all(b.tokens_per_s == b.output_tokens / 15 for b in rep.throughput)
    assert sum(rep.latency_histogram.counts) + rep.latency_histogram.above == len(ok)
    assert rep.scores == mean_scores(db, job_id) and set(rep.scores) == {"bleu", "chrf"}
    assert set(rep.corpus_scores) == {"corpus_bleu", "corpus_chrf"}
    assert all(sum(h.counts) == len(ok) for h in rep.score_histograms.values())
    assert rep.elapsed_s == 15 * (N + 1)


class _Page(HTMLParser):
    """Collects each svg's data marks: polyline points, circles, bars."""

    def __init__(self) -> None:
        super().__init__()
        self.svg: str | None = None
        self.marks: dict[str, Counter[str]] = {}
        self.tags: Counter[str] = Counter()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags[tag] += 1
        if tag == "svg":
            self.svg = a.get("id") or "?"
            self.marks[self.svg] = Counter()
        elif self.svg and tag == "polyline" and a.get("class") == "series":
            self.marks[self.svg]["points"] += len((a.get("points") or "").split())
        elif self.svg and a.get("class") in ("bar", "pt"):
            self.marks[self.svg][str(a["class"])] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _html(db: Database, job_id: int) -> tuple[JobReport, str]:
    rep = build_report(db, job_id)
    return rep, render_html(rep, generated_at=datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_html_page_parses_and_has_every_plot(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    rep, page = _html(db, _job(db, tmp_path))
    p = _Page()
    p.feed(page)
    p.close()
    assert p.tags["script"] == 0 and p.tags["html"] == 1  # self-contained, and escaped
    assert EVIL in "".join(p.text)
    n = len(rep.throughput)
    assert p.marks["throughput"] == Counter(points=n, pt=n)
    assert p.marks["latency"]["bar"] == LATENCY_BINS
    assert p.marks["failures"]["bar"] == len(rep.failures) == 2
    assert p.marks["score-chrf"]["bar"] == p.marks["score-bleu"]["bar"] == SCORE_BINS
    assert set(p.marks) == {"throughput", "latency", "failures", "score-chrf", "score-bleu"}


def test_html_of_a_job_with_nothing_done_yet(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = submit(db, write_jsonl(tmp_path / "q.jsonl", [{"question": "why?"}]), "qa")
    rep, page = _html(db, job_id)
    assert rep.totals.pending == 1 and rep.throughput == [] and rep.totals.latency_ms.p50 is None
    p = _Page()
    p.feed(page)
    assert p.marks == {} and "No results yet." in page and "No failures." in page


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (the HTML checks above ran)")
def test_html_renders_in_a_browser(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    _, page = _html(db, _job(db, tmp_path))
    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    png = tmp_path / "report.png"
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            "--window-size=1400,1800",
            html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _sampled_chunks(db: Database, job_id: int, step: int) -> list[int]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Chunk.id)
                .where(Chunk.job_id == job_id, Chunk.status == "done", Chunk.seq % step == 0)
                .order_by(Chunk.seq)
            )
        )


def _rows_of(db: Database, chunk_ids: list[int]) -> list[Any]:
    with db.session() as s:
        return list(
            s.execute(
                select(Result)
                .join(Request, Request.id == Result.request_id)
                .where(Request.chunk_id.in_(chunk_ids))
            ).scalars()
        )


def test_a_big_job_is_reported_from_chunk_sums_and_a_sample_of_chunks(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the sample size: counts, tokens and throughput exact from the chunks; latency,
    score histograms, corpus scores and structured answers over whole chunks spread by seq."""
    db = get_database(db_url)
    job_id = _job(db, tmp_path)  # 40 requests in 7 chunks of 6 (the last of 4)
    with db.session() as s:  # a few choice answers, to be counted in the sample only
        for rid, text in s.execute(
            select(Result.id, Result.output_text).where(Result.job_id == job_id, Result.status == "succeeded")
        ).all()[::3]:
            s.execute(
                update(Result)
                .where(Result.id == rid)
                .values(
                    valid=rid % 2 == 0,
                    params_json={"output_format": {"kind": "choice"}},
                    output_text=text[:5],
                )
            )
    exact = build_report(db, job_id)
    assert exact.sample is None and exact.structured is not None
    monkeypatch.setattr("lmjobs.jobs.report.SAMPLE_REQUESTS", 12)
    monkeypatch.setattr("lmjobs.jobs.control.SAMPLE_REQUESTS", 12)  # 2 chunks: every 4th by seq
    rep = build_report(db, job_id)
    assert rep.sample is not None and (rep.sample.chunks, rep.sample.chunks_closed) == (2, 7)
    assert rep.sample.requests == 12
    assert set(rep.sample.figures) == {"latency", "structured", "corpus_scores"}

    t, e = rep.totals, exact.totals  # exact: from the chunks
    assert (t.requests, t.succeeded, t.failed, t.pending) == (e.requests, e.succeeded, e.failed, e.pending)
    assert (t.input_tokens, t.output_tokens) == (e.input_tokens, e.output_tokens)
    assert [(f.task, f.requests, f.succeeded, f.output_tokens) for f in rep.per_task] == [
        ("translate", t.requests, t.succeeded, t.output_tokens)
    ]
    assert sum(b.requests for b in rep.throughput) == N
    assert sum(b.output_tokens for b in rep.throughput) == t.output_tokens
    assert rep.failures == exact.failures and rep.scores == exact.scores
    assert rep.score_histograms == exact.score_histograms  # few scores: exact

    rows = _rows_of(db, _sampled_chunks(db, job_id, 4))
    ok = sorted(r.latency_ms for r in rows if r.status == "succeeded")
    assert len(rows) == 12 and t.latency_ms.p50 == percentile(ok, 0.5) and t.latency_ms.max == ok[-1]
    assert sum(rep.latency_histogram.counts) + rep.latency_histogram.above == len(ok)
    answers = [r for r in rows if r.status == "succeeded" and r.valid is not None]
    assert rep.structured is not None and rep.structured.answers == len(answers) > 0
    assert rep.structured.valid == sum(bool(r.valid) for r in answers)
    assert dict(rep.structured.labels) == dict(Counter(r.output_text for r in answers if r.valid))
    assert set(rep.corpus_scores) == {"corpus_bleu", "corpus_chrf"}

    as_json = rep.to_json()
    assert as_json["sample"]["figures"] == rep.sample.figures and as_json["sample"]["requests"] == 12
    assert 'id="sample"' in render_html(rep, generated_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert 'id="sample"' not in render_html(exact, generated_at=datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_a_big_jobs_scores_come_from_the_sample_above_the_exact_limit(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = get_database(db_url)
    job_id = _job(db, tmp_path)
    monkeypatch.setattr("lmjobs.jobs.report.SAMPLE_REQUESTS", 12)
    monkeypatch.setattr("lmjobs.jobs.control.SAMPLE_REQUESTS", 12)
    monkeypatch.setattr("lmjobs.jobs.control.SCORE_EXACT_LIMIT", 10)
    rep = build_report(db, job_id)
    assert rep.sample is not None and {"scores", "score_histograms"} <= set(rep.sample.figures)
    ids = {r.request_id for r in _rows_of(db, _sampled_chunks(db, job_id, 4))}
    with db.session() as s:
        scores = s.execute(select(Score.metric, Score.value).where(Score.request_id.in_(ids))).all()
    chrf = [v for m, v in scores if m == "chrf"]
    assert chrf and rep.scores["chrf"] == pytest.approx(sum(chrf) / len(chrf))
    assert sum(rep.score_histograms["chrf"].counts) == len(chrf)


def test_the_cli_says_which_figures_are_sampled(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample size is a constant of the code: a job of 13,000 requests is above it."""
    from lmjobs.bench.follow import build_job
    from lmjobs.jobs.control import SAMPLE_REQUESTS

    db = get_database(db_url)
    job_id = build_job(db, SAMPLE_REQUESTS + 200)
    env = cli_env(LMJOBS_DATABASE_URL=db_url)
    text = run_cli(["report", str(job_id)], env, check=True).stdout
    assert "sampled" in text and "latency: over" in text and "counts, tokens and throughput are exact" in text
    cli = json.loads(run_cli(["report", str(job_id), "--json"], env, check=True).stdout)
    assert cli["sample"]["figures"] == ["latency"]  # 7,600 scores: exact means and histograms
    assert cli["totals"]["requests"] == SAMPLE_REQUESTS + 200
    assert cli["totals"]["output_tokens"] == 12 * (cli["totals"]["succeeded"] + cli["totals"]["failed"])


def test_a_big_job_of_several_tasks_reports_per_task_figures_from_the_sample(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI input mixing chat and completions: above the sample size, the per-task rows are
    the sampled chunks' requests grouped by their own task (looked up by key), totals exact."""
    db = get_database(db_url)
    lines = []
    for i in range(30):
        body: dict[str, Any] = (
            {"messages": [{"role": "user", "content": f"hello number {i}"}]}
            if i % 3
            else {"prompt": f"once upon a time {i}"}
        )
        url = "/v1/chat/completions" if i % 3 else "/v1/completions"
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": url, "body": {"model": "m", **body}})
    job_id = submit(db, write_jsonl(tmp_path / "in.jsonl", lines), "chat", model="m", chunk_size=5)
    run(db, job_id, _engine)
    exact = build_report(db, job_id)
    assert exact.sample is None and [f.task for f in exact.per_task] == ["chat", "generate"]
    monkeypatch.setattr("lmjobs.jobs.report.SAMPLE_REQUESTS", 10)
    monkeypatch.setattr("lmjobs.jobs.control.SAMPLE_REQUESTS", 10)  # 2 chunks of 6: every 3rd by seq
    rep = build_report(db, job_id)
    assert rep.sample is not None and "per_task" in rep.sample.figures
    ids = _sampled_chunks(db, job_id, 3)
    assert (rep.sample.chunks, rep.sample.requests) == (len(ids), 5 * len(ids))
    with db.session() as s:
        sampled = s.execute(
            select(Request.task, Result.status, Result.output_tokens)
            .join(Result, Result.request_id == Request.id)
            .where(Request.chunk_id.in_(ids), Result.sample_index == 0)
        ).all()
    want = {
        task: (
            sum(1 for t, _, _ in sampled if t == task),
            sum(1 for t, st, _ in sampled if t == task and st == "succeeded"),
            sum(n or 0 for t, _, n in sampled if t == task),
        )
        for task in ("chat", "generate")
    }
    assert {f.task: (f.requests, f.succeeded, f.output_tokens) for f in rep.per_task} == want
    t, e = rep.totals, exact.totals  # exact: from the chunks
    assert (t.requests, t.succeeded, t.failed, t.output_tokens) == (
        e.requests, e.succeeded, e.failed, e.output_tokens
    )  # fmt: skip
