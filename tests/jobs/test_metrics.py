"""Quality scores: the numbers are the libraries' own, stored once per (request, metric)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import sacrebleu
from analytics_data import run, submit, submit_and_run, translate_rows, write_jsonl
from fake_engine import FakeEngine
from rouge_score import rouge_scorer
from sqlalchemy import func, select

from lmjobs.db.models import JobStatus, Request, Result, Score
from lmjobs.db.session import Database, get_database
from lmjobs.jobs import metrics
from lmjobs.jobs.control import job_status
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest

PAIRS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("Der Hund bellt laut", "Der Hund bellt sehr laut."),
    ("", "something"),
    ("completely different words", "nothing in common here"),
]


@pytest.mark.parametrize(("hyp", "ref"), PAIRS)
def test_sentence_metrics_equal_direct_library_calls(hyp: str, ref: str) -> None:
    assert metrics.chrf(hyp, ref) == sacrebleu.sentence_chrf(hyp, [ref]).score
    assert metrics.bleu(hyp, ref) == sacrebleu.sentence_bleu(hyp, [ref]).score
    direct = rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure
    assert metrics.rouge_l(hyp, ref) == direct


def test_squad_exact_match_and_f1() -> None:
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert metrics.exact_match("Paris, France", "Paris") == 0.0
    # pred: paris france (2 tokens), gold: paris (1): P = 1/2, R = 1, F1 = 2/3
    assert metrics.token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("", "Paris") == 0.0
    assert metrics.token_f1("London", "Paris") == 0.0


def _outputs(db: Database, job_id: int) -> dict[int, tuple[str, str | None]]:
    with db.session() as s:
        rows = s.execute(
            select(Request.id, Result.output_text, Request.reference)
            .join(Result, Result.request_id == Request.id)
            .where(Request.job_id == job_id)
        ).all()
    return {rid: (out or "", ref) for rid, out, ref in rows}


def _scores(db: Database, job_id: int) -> dict[tuple[int, str], float]:
    with db.session() as s:
        rows = s.execute(select(Score.request_id, Score.metric, Score.value).where(Score.job_id == job_id))
        return {(rid, m): v for rid, m, v in rows}


def test_translate_job_is_scored_when_it_finishes(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "PAGE", 3)  # several pages even for a small job
    db = get_database(db_url)
    rows = translate_rows(10)
    del rows[4]["reference"]  # no reference: not scored
    job_id = submit_and_run(db, write_jsonl(tmp_path / "t.jsonl", rows), "translate")

    outputs = _outputs(db, job_id)
    scores = _scores(db, job_id)  # written by finalize_job_if_done, nothing else called
    with_ref = {rid: v for rid, v in outputs.items() if v[1] is not None}
    assert len(with_ref) == 9
    assert set(scores) == {(rid, m) for rid in with_ref for m in ("chrf", "bleu")}
    for rid, (out, ref) in with_ref.items():
        assert ref is not None
        assert scores[(rid, "chrf")] == pytest.approx(sacrebleu.sentence_chrf(out, [ref]).score)
        assert scores[(rid, "bleu")] == pytest.approx(sacrebleu.sentence_bleu(out, [ref]).score)

    assert metrics.score_job(db, job_id) == 0  # idempotent
    st = job_status(db, job_id)
    assert st.scores["chrf"] == pytest.approx(sum(v for (_, m), v in scores.items() if m == "chrf") / 9)
    hyps = [with_ref[r][0] for r in sorted(with_ref)]
    refs = [str(with_ref[r][1]) for r in sorted(with_ref)]
    corpus = metrics.corpus_scores(db, job_id)
    assert corpus["corpus_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus["corpus_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_summarize_and_qa_metrics(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    summ = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"text": "alpha beta gamma delta", "reference": "delta gamma beta alpha"},
            {"text": "one two three", "reference": "four five"},
        ],
    )
    job_s = submit_and_run(db, summ, "summarize")
    qa = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question": "Where?", "context": "c", "reference": "Concisely. answer"},
            {"question": "Who is it?", "reference": "nobody"},
        ],
    )
    job_q = submit_and_run(db, qa, "qa")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    s_scores = _scores(db, job_s)
    for rid, (out, ref) in _outputs(db, job_s).items():
        assert s_scores[(rid, "rouge_l")] == scorer.score(str(ref), out)["rougeL"].fmeasure
    q_scores = _scores(db, job_q)
    for rid, (out, ref) in _outputs(db, job_q).items():
        assert q_scores[(rid, "exact_match")] == metrics.exact_match(out, str(ref))
        assert q_scores[(rid, "f1")] == metrics.token_f1(out, str(ref))
    assert metrics.corpus_scores(db, job_q) == {}


def _half_failing(requests: Sequence[GenRequest]) -> list[Generation]:
    out = FakeEngine()(requests)
    return [
        g
        if i % 2 == 0
        else Generation(
            key=g.key,
            text="",
            finish_reason=FinishReason.ERROR,
            input_tokens=0,
            output_tokens=0,
            latency_ms=0.0,
            error="boom",
        )
        for i, g in enumerate(out)
    ]


def test_failed_results_are_not_scored(sqlite_url: str, tmp_path: Path) -> None:
    db = get_database(sqlite_url)
    job_id = submit(db, write_jsonl(tmp_path / "t.jsonl", translate_rows(8)), "translate")
    run(db, job_id, _half_failing)
    assert job_status(db, job_id).status == JobStatus.COMPLETED_WITH_FAILURES.value
    with db.session() as s:
        ok = s.scalar(select(func.count()).where(Result.job_id == job_id, Result.status == "succeeded"))
        n = s.scalar(select(func.count()).where(Score.job_id == job_id))
    assert ok == 4 and n == 8


def test_a_scoring_failure_never_fails_the_job(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = get_database(sqlite_url)

    def broken(*_: object) -> int:
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(metrics, "score_job", broken)
    monkeypatch.setattr(metrics, "score_pair", broken)  # the per-chunk scoring too
    job_id = submit_and_run(db, write_jsonl(tmp_path / "t.jsonl", translate_rows(3)), "translate")
    assert job_status(db, job_id).status == JobStatus.COMPLETED.value
    assert job_status(db, job_id).scores == {}
    monkeypatch.undo()
    assert metrics.score_job(db, job_id) == 6  # a later report fills them in


def test_scores_grow_chunk_by_chunk_while_the_job_runs(sqlite_url: str, tmp_path: Path) -> None:
    """Each chunk scores its own results when it closes: analysts see scores of a running
    job, and no worker is left scoring a whole job at its end."""
    from analytics_data import FAKE_CTX

    from lmjobs.db.models import Chunk, utcnow
    from lmjobs.jobs.chunks import process_chunk
    from lmjobs.jobs.lifecycle import start_due_jobs

    db = get_database(sqlite_url)
    job_id = submit(db, write_jsonl(tmp_path / "t.jsonl", translate_rows(8)), "translate", chunk_size=4)
    start_due_jobs(db, utcnow())
    with db.session() as s:
        first = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)).first()
    assert first is not None
    process_chunk(db, first, generate=FakeEngine(), ctx=FAKE_CTX)
    assert job_status(db, job_id).status == JobStatus.RUNNING.value
    scored = {rid for rid, _ in _scores(db, job_id)}
    assert len(scored) == 4
    assert set(_scores(db, job_id).values())  # real values, not placeholders
