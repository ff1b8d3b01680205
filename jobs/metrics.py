"""Quality scores of results against their requests' references.

Which metrics a job gets depends on its task:

========== =========================================== =======
task       metrics (``scores.metric``)                 scale
========== =========================================== =======
translate  ``chrf``, ``bleu`` (sacrebleu, sentence)    0..100
summarize  ``rouge_l`` (rouge-score F-measure)         0..1
qa         ``exact_match``, ``f1`` (SQuAD normalized)   0..1
========== =========================================== =======

The scales are the libraries' own (sacrebleu reports 0..100, as papers do), so a number
here equals the number the library gives for the same strings.

:func:`score_job` streams succeeded results that have a reference and no score yet, in
pages, and inserts their scores with insert-or-ignore: running it again (or from two
places at once) adds nothing twice. Corpus-level BLEU/chrF are computed by
:func:`corpus_scores` from summed sentence statistics, page by page, so memory does not
grow with the job; the result equals ``sacrebleu.corpus_bleu`` on the whole corpus.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from sqlalchemy import and_, exists, func, select

from lmjobs.db.session import Database, rows_changed
from lmjobs.db.tables import ResultStatus, jobs, requests, results, scores

log = logging.getLogger(__name__)

PAGE = 1000
METRICS: dict[str, tuple[str, ...]] = {
    "translate": ("chrf", "bleu"),
    "summarize": ("rouge_l",),
    "qa": ("exact_match", "f1"),
}
CORPUS_METRICS: dict[str, tuple[str, ...]] = {"translate": ("corpus_chrf", "corpus_bleu")}

# -- sentence-level metrics ---------------------------------------------------------------


def chrf(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def bleu(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(hypothesis: str, reference: str) -> float:
    # RougeScorer.score(target, prediction): the reference comes first.
    return float(_rouge().score(reference, hypothesis)["rougeL"].fmeasure)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1; two empty answers agree (1.0), one empty answer scores 0."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "chrf": chrf,
    "bleu": bleu,
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "f1": token_f1,
}


def score_pair(task: str, hypothesis: str, reference: str) -> dict[str, float]:
    """Every metric of ``task`` for one output; empty for tasks without metrics."""
    return {m: SCORERS[m](hypothesis, reference) for m in METRICS.get(task, ())}


# -- the job ------------------------------------------------------------------------------


def _job_task(db: Database, job_id: int) -> str | None:
    with db.connection() as s:
        return s.scalar(select(jobs.c.task).where(jobs.c.id == job_id))


def _scorable(job_id: int, after: int, *, unscored_only: bool) -> Any:
    """(line, request id, output, reference) of succeeded results with a reference.

    Keyset pages on (job_id, line_number), the requests' unique index; the join names the
    job too, so it can use the results' (job_id, request_id) index.
    """
    q = (
        select(requests.c.line_number, requests.c.id, results.c.output_text, requests.c.reference)
        .join(results, and_(results.c.request_id == requests.c.id, results.c.job_id == job_id))
        .where(
            requests.c.job_id == job_id,
            requests.c.line_number > after,
            requests.c.reference.is_not(None),
            results.c.status == ResultStatus.SUCCEEDED.value,
        )
        .order_by(requests.c.line_number)
        .limit(PAGE)
    )
    if unscored_only:
        q = q.where(~exists().where(scores.c.request_id == requests.c.id))
    return q


def _pages(db: Database, job_id: int, *, unscored_only: bool) -> Iterator[list[Any]]:
    last = 0
    while True:
        with db.connection() as s:
            page = list(s.execute(_scorable(job_id, last, unscored_only=unscored_only)).all())
        if not page:
            return
        last = page[-1][0]
        yield page


def score_job(db: Database, job_id: int) -> int:
    """Score the job's succeeded results that have a reference; returns the rows inserted.

    Idempotent: requests that already have scores are skipped, and the insert ignores a
    (request, metric) that another caller wrote in between.
    """
    task = _job_task(db, job_id)
    if task not in METRICS:
        return 0
    inserted = 0
    for page in _pages(db, job_id, unscored_only=True):
        rows = [
            {"job_id": job_id, "request_id": rid, "metric": metric, "value": value}
            for _, rid, output, ref in page
            for metric, value in score_pair(task, output or "", ref).items()
        ]
        if rows:
            from lmjobs.db.models import Score  # the ORM and the dialects' modules: only to write
            from lmjobs.db.upsert import insert_ignore

            with db.session() as s:
                res = s.execute(insert_ignore(s, Score, rows, ["request_id", "metric"]))
                inserted += rows_changed(res)
    return inserted


def mean_scores(db: Database, job_id: int) -> dict[str, float]:
    """Mean of each metric over the job's scored results (one cheap aggregate query)."""
    with db.connection() as s:
        rows = s.execute(
            select(scores.c.metric, func.avg(scores.c.value))
            .where(scores.c.job_id == job_id)
            .group_by(scores.c.metric)
            .order_by(scores.c.metric)
        ).all()
    return {str(m): float(v) for m, v in rows if v is not None}


def corpus_scores(db: Database, job_id: int) -> dict[str, float]:
    """Corpus-level chrF and BLEU of a translate job (empty for other tasks or no data).

    sacrebleu's corpus score is a function of the sentence statistics summed over the
    corpus; summing them page by page gives the same number as ``corpus_bleu`` on all
    sentences at once, in bounded memory.
    """
    if _job_task(db, job_id) not in CORPUS_METRICS:
        return {}
    from sacrebleu.metrics import BLEU, CHRF

    metrics: dict[str, Any] = {"corpus_chrf": CHRF(), "corpus_bleu": BLEU()}
    totals: dict[str, list[Any] | None] = dict.fromkeys(metrics)
    for page in _pages(db, job_id, unscored_only=False):
        hyps = [output or "" for _, _, output, _ in page]
        refs = [[ref for _, _, _, ref in page]]
        for name, metric in metrics.items():
            stats = metric._extract_corpus_statistics(hyps, refs)
            prev = totals[name]
            stats_sum = [sum(col) for col in zip(*stats, strict=True)]
            if prev is not None:
                stats_sum = [a + b for a, b in zip(prev, stats_sum, strict=True)]
            totals[name] = stats_sum
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        summed = totals[name]
        if summed is not None:
            out[name] = float(metric._compute_score_from_stats(summed).score)
    return out


def score_values(db: Database, job_id: int) -> Iterator[tuple[str, float]]:
    """Every (metric, value) of the job, streamed (for histograms)."""
    last = 0
    while True:
        with db.connection() as s:
            page = s.execute(
                select(scores.c.id, scores.c.metric, scores.c.value)
                .where(scores.c.job_id == job_id, scores.c.id > last)
                .order_by(scores.c.id)
                .limit(PAGE * 5)
            ).all()
        if not page:
            return
        last = page[-1][0]
        for _, metric, value in page:
            yield str(metric), float(value)


def score_new_results(db: Database, job_id: int, todo: list[tuple[int, str, str, str]]) -> None:
    """Score a chunk's new results (request id, output, reference, task) right after it
    closes, so scores grow with the job and no worker is left scoring a whole job at its
    end. A scoring failure never fails the chunk (``lmjobs report`` scores what is missing)."""
    if not todo:
        return
    from lmjobs.db.models import Score
    from lmjobs.db.upsert import insert_ignore_many

    try:
        rows = [
            {"job_id": job_id, "request_id": rid, "metric": metric, "value": value}
            for rid, output, reference, task in todo
            for metric, value in score_pair(task, output, reference).items()
        ]
        if rows:
            with db.session() as s:
                s.execute(insert_ignore_many(s, Score, ["request_id", "metric"]), rows)
    except Exception:
        log.exception("scoring a chunk of job %s failed; `lmjobs report` will try again", job_id)


def score_job_quietly(db: Database, job_id: int) -> None:
    """Score a job that just finished; a scoring failure never fails the job
    (``lmjobs report`` scores whatever is still missing)."""
    try:
        score_job(db, job_id)
    except Exception:
        log.exception("scoring job %s failed; `lmjobs report %s` will try again", job_id, job_id)
