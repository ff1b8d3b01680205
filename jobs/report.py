"""``lmjobs report JOB``: the figures of one job.

A job of at most ``SAMPLE_REQUESTS`` requests is read whole: one pass over its requests
(with their results, when they have one) in pages gives counts, tokens, latency percentiles
and throughput per task; failures and score means are aggregate queries; score histograms
stream the scores table. Every figure is exact.

A bigger job is never read whole, so the report answers in well under a second at ten
million requests (docs/benchmarks.md):

* Counts and token totals are sums over the job's chunks, written when each chunk closed
  (``jobs/control.py``, ``job_progress``); exact.
* Throughput is bucketed by the chunks' ``finished_at`` (a chunk writes its results at
  once), grouped in SQL; exact up to that: a chunk's requests fall in the bucket it closed in.
* Failure reasons are counted over at most ``control.FAILURE_SAMPLE`` failed results, the
  rest shown as "(other)", as for a small job.
* Latency percentiles and histogram, per-task figures of a job whose requests run under
  several tasks (OpenAI input: chat and completions), structured answers, score histograms,
  corpus scores, and mean scores when the job has more than ``control.SCORE_EXACT_LIMIT``
  score rows come from a sample: up to ``control.SAMPLE_CHUNKS`` closed chunks (about
  ``SAMPLE_REQUESTS`` requests) spread evenly over the job by ``seq``: their requests read in
  one statement through ``ix_requests_chunk``, then their results (and scores) looked up by
  unique key, ``control.KEYS_PER_STATEMENT`` requests a statement (``control.sample_chunks``,
  ``control.keyed_rows``: about 15 statements instead of one a chunk). Whole
  chunks are a cluster sample: requests of one chunk ran together, so the spread over
  ``seq`` (submission order, and over the job's run time) is what makes it representative.
  ``JobReport.sample`` says which figures are sampled and how big the sample is; the text,
  JSON and HTML reports show it.

* Percentiles are nearest-rank: the smallest latency with at least p% of requests at or
  below it (the same definition as the example query in docs/schema.md).
* Throughput buckets are by result ``created_at``, from the job's start; a chunk writes
  its results at once, so a bucket shorter than a chunk is bursty. The width is a round
  number of seconds giving at most ``MAX_BUCKETS`` points.
* The latency histogram spans 0..p99; slower requests are counted, not drawn.
* Structured answers (requests with an output format): the share of answers that are
  complete under their format (``results.valid``), counted per sample, and for ``choice``
  formats how often each label was answered; two aggregate queries.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Float, Integer, and_, case, cast, func, select

from lmjobs.db.session import Database
from lmjobs.db.tables import ChunkStatus, ResultStatus, chunks, rejects, requests, results
from lmjobs.jobs.control import (
    SAMPLE_REQUESTS,
    JobRow,
    Progress,
    Sample,
    bounded_mean_scores,
    core,
    failure_reasons,
    get_job,
    job_progress,
    keyed_rows,
    sample_of,
)
from lmjobs.jobs.metrics import CORPUS_METRICS, corpus_scores, mean_scores, score_values

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

PAGE = 5000
MAX_BUCKETS = 60
LATENCY_BINS = 20
SCORE_BINS = 10
TOP_FAILURES = 10
TOP_LABELS = 50  # choice labels listed; the rest are summed as "(other)"
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
SCORE_RANGES = {"chrf": 100.0, "bleu": 100.0}  # the rest are 0..1


@dataclass
class Latency:
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None


@dataclass
class Figures:
    """Counts, tokens and latency of a set of requests (all of a job, or one task)."""

    task: str
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: Latency = field(default_factory=Latency)


@dataclass
class Bucket:
    start: datetime
    requests: int = 0
    output_tokens: int = 0
    tokens_per_s: float = 0.0


@dataclass
class Histogram:
    lo: float
    hi: float
    counts: list[int]
    above: int = 0  # values past ``hi`` (not drawn)

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / len(self.counts) if self.counts else 0.0


@dataclass
class StructuredAnswers:
    """The answers of constrained requests (JSON, JSON Schema, choice, regex), per sample."""

    answers: int  # succeeded samples of constrained requests
    valid: int  # of those, complete under their format
    valid_share: float  # valid / answers
    # Choice formats: each valid answer's label and how often, most common first; "(other)" last.
    labels: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class SampleInfo:
    """Which figures of a big job's report come from a sample, and how big it is."""

    requests: int  # requests in the sample
    chunks: int  # closed chunks they were drawn from
    chunks_closed: int  # closed chunks of the job
    figures: list[str]  # the sampled figures, by name


@dataclass
class JobReport:
    job_id: int
    name: str | None
    task: str
    model: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lines_rejected: int
    totals: Figures
    per_task: list[Figures]
    bucket_s: float
    throughput: list[Bucket]
    latency_histogram: Histogram
    failures: list[tuple[str, int]]  # (reason, count), most common first; "(other)" last
    scores: dict[str, float]  # mean per metric
    corpus_scores: dict[str, float]
    score_histograms: dict[str, Histogram]
    structured: StructuredAnswers | None = None  # None: the job has no constrained answers
    sample: SampleInfo | None = None  # None: every figure is exact (a small job)

    @property
    def elapsed_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or (self.throughput[-1].start if self.throughput else None)
        return max(0.0, (end - self.started_at).total_seconds()) if end else None

    def to_json(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if isinstance(v, datetime):
                return v.isoformat()
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            return v

        return {**conv(asdict(self)), "elapsed_s": self.elapsed_s}


def percentile(sorted_values: Any, p: float) -> float | None:
    """Nearest rank: the smallest value with at least ``p`` of the values at or below it."""
    n = len(sorted_values)
    if n == 0:
        return None
    return float(sorted_values[max(0, math.ceil(p * n) - 1)])


def latency_of(values: array) -> Latency:
    s = sorted(values)
    if not s:
        return Latency()
    p50, p90, p99 = (percentile(s, p) for p in (0.5, 0.9, 0.99))
    return Latency(p50, p90, p99, s[-1], sum(s) / len(s))


def histogram(values: Any, lo: float, hi: float, bins: int) -> Histogram:
    h = Histogram(lo=lo, hi=hi, counts=[0] * bins)
    width = (hi - lo) / bins if hi > lo else 1.0
    for v in values:
        if v > hi:
            h.above += 1
        else:
            h.counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    return h


def bucket_width(span_s: float) -> float:
    target = span_s / (MAX_BUCKETS - 1)  # floor(span / width) + 1 points, at most MAX_BUCKETS
    return float(next((s for s in _STEPS if s >= target), math.ceil(target / 86400) * 86400))


_SUCCEEDED = ResultStatus.SUCCEEDED.value


class _Acc:
    """Per-task running figures and latencies."""

    def __init__(self, task: str) -> None:
        self.fig = Figures(task=task)
        self.lat = array("d")

    def add(self, status: str | None, tin: int | None, tout: int | None, ms: float | None) -> None:
        f = self.fig
        f.requests += 1
        if status is None:
            f.pending += 1
            return
        if status == _SUCCEEDED:
            f.succeeded += 1
            if ms is not None:
                self.lat.append(ms)
        else:
            f.failed += 1
        f.input_tokens += tin or 0
        f.output_tokens += tout or 0

    def done(self) -> Figures:
        self.fig.latency_ms = latency_of(self.lat)
        return self.fig


def _time_span(db: Database, job: JobRow) -> tuple[datetime | None, datetime | None]:
    with db.connection() as s:
        first, last = s.execute(
            select(func.min(results.c.created_at), func.max(results.c.created_at)).where(
                results.c.job_id == job.id
            )
        ).one()
    if first is None:
        return None, None
    start = min(first, job.started_at) if job.started_at else first
    return start, last


def _rows(db: Database, job_id: int) -> Any:
    # A small job's report only (every row, through the export's pages, which take the
    # models' columns): a big job's never loads the ORM.
    from lmjobs.db.models import Request, Result
    from lmjobs.jobs.export import rows_in_line_order

    return rows_in_line_order(
        db,
        job_id,
        Request.task,
        Result.status,
        Result.input_tokens,
        Result.output_tokens,
        Result.latency_ms,
        Result.created_at,
        page=PAGE,
    )


def _failures(db: Database, job_id: int, failed: int) -> list[tuple[str, int]]:
    """The top reasons among (at most ``control.FAILURE_SAMPLE``) failed requests, through the
    (job_id, status) index; "(other)": the rest of the job's ``failed`` requests."""
    if not failed:
        return []
    with db.connection() as s:
        reasons, _ = failure_reasons(s, job_id, top=TOP_FAILURES)
    top = list(reasons.items())
    rest = failed - sum(n for _, n in top)
    return [*top, ("(other)", rest)] if rest > 0 else top


def score_histograms(values: Iterable[tuple[str, float]]) -> dict[str, Histogram]:
    """A histogram of each metric's (metric, value) pairs, over its range in ``SCORE_BINS``."""
    hists: dict[str, Histogram] = {}
    for metric, value in values:
        h = hists.get(metric)
        if h is None:
            h = hists[metric] = Histogram(0.0, SCORE_RANGES.get(metric, 1.0), [0] * SCORE_BINS)
        i = int((value - h.lo) / h.width) if h.width else 0
        h.counts[min(SCORE_BINS - 1, max(0, i))] += 1
    return dict(sorted(hists.items()))


def _score_histograms(db: Database, job_id: int) -> dict[str, Histogram]:
    return score_histograms(score_values(db, job_id))


def structured_answers(db: Database, job_id: int) -> StructuredAnswers | None:
    """Valid share and choice labels of the job's constrained answers; None when it has none.

    A constrained answer is a succeeded result with a validity verdict (``valid`` is NULL for
    unconstrained requests and for failed ones); labels are the ``output_text`` of valid
    answers whose format (``params_json.output_format.kind``) is ``choice``."""
    answered = (
        results.c.job_id == job_id,
        results.c.status == ResultStatus.SUCCEEDED.value,
        results.c.valid.is_not(None),
    )
    with db.connection() as s:
        answers, valid = s.execute(
            select(func.count(), func.count().filter(results.c.valid.is_(True))).where(*answered)
        ).one()
        if not answers:
            return None
        kind = results.c.params_json["output_format"]["kind"].as_string()
        rows = s.execute(
            select(results.c.output_text, func.count())
            .where(*answered, results.c.valid.is_(True), kind == "choice")
            .group_by(results.c.output_text)
            .order_by(func.count().desc(), results.c.output_text)
        ).all()
    labels = [(str(label), int(n)) for label, n in rows[:TOP_LABELS]]
    rest = sum(int(n) for _, n in rows[TOP_LABELS:])
    return StructuredAnswers(
        answers=int(answers),
        valid=int(valid),
        valid_share=int(valid) / int(answers),
        labels=[*labels, ("(other)", rest)] if rest else labels,
    )


def build_report(db: Database, job_id: int) -> JobReport:
    """Every figure of the report; reads only (run ``score_job`` first for fresh scores).
    Exact for a job of at most ``SAMPLE_REQUESTS`` requests, else partly from a sample (see
    the module's docstring)."""
    job = get_job(db, job_id)
    if job.requests_total > SAMPLE_REQUESTS:
        return _sampled_report(db, job)
    start, end = _time_span(db, job)
    buckets: list[Bucket] = []
    width = 1.0
    if start is not None and end is not None:
        width = bucket_width((end - start).total_seconds())
        n_buckets = int((end - start).total_seconds() // width) + 1
        buckets = [Bucket(start=start + timedelta(seconds=i * width)) for i in range(n_buckets)]
    total, per_task = _Acc("all"), dict[str, _Acc]()
    for _, task, status, tin, tout, ms, created in _rows(db, job_id):
        total.add(status, tin, tout, ms)
        acc = per_task.get(task)
        if acc is None:
            acc = per_task[task] = _Acc(task)
        acc.add(status, tin, tout, ms)
        if created is not None and start is not None:
            b = buckets[min(len(buckets) - 1, int((created - start).total_seconds() // width))]
            b.requests += 1
            b.output_tokens += tout or 0
    for b in buckets:
        b.tokens_per_s = b.output_tokens / width
    lat = sorted(total.lat)
    p99 = percentile(lat, 0.99) or 0.0
    totals = total.done()
    with db.connection() as s:
        rejected = s.scalar(select(func.count()).where(rejects.c.job_id == job_id)) or 0
        progress = job_progress(s, [job_id])[job_id]  # the job's counts, as `status` reads them
    totals.requests = job.requests_total
    totals.succeeded, totals.failed = progress.succeeded, progress.failed
    totals.pending = max(0, job.requests_total - progress.succeeded - progress.failed)
    return JobReport(
        **_job_fields(job, rejected),
        totals=totals,
        per_task=[a.done() for _, a in sorted(per_task.items())],
        bucket_s=width,
        throughput=buckets,
        latency_histogram=histogram(lat, 0.0, p99 if p99 > 0 else 1.0, LATENCY_BINS),
        failures=_failures(db, job_id, totals.failed),
        scores=mean_scores(db, job_id),
        corpus_scores=corpus_scores(db, job_id),
        score_histograms=_score_histograms(db, job_id),
        structured=structured_answers(db, job_id),
    )


# -- a big job: sums over chunks and a sample of them ----------------------------------------


def _job_fields(job: JobRow, rejected: int) -> dict[str, Any]:
    """The report's fields that describe the job itself (both ways of building a report)."""
    return {
        "job_id": job.id,
        "name": job.name,
        "task": job.task,
        "model": job.model,
        "status": job.status,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "lines_rejected": max(int(rejected), job.lines_rejected),
    }


def _epoch(session: Connection | Session, column: Any) -> Any:
    """Seconds since 1970 of a timestamp column, in SQL (PostgreSQL: ``date_part``, a double;
    ``EXTRACT`` gives a numeric, whose arithmetic took a third more of the throughput query)."""
    if core(session).dialect.name == "postgresql":
        return func.date_part("epoch", column, type_=Float)
    return (func.julianday(column) - 2440587.5) * 86400.0


def _chunk_throughput(
    session: Connection | Session, job: JobRow, progress: Progress
) -> tuple[float, list[Bucket]]:
    """Buckets of the job's closed chunks by ``finished_at``: their requests and output
    tokens; one aggregate statement over the job's chunk rows (``ix_chunks_job_id``), over
    the span ``job_progress`` read."""
    finished = and_(
        chunks.c.job_id == job.id,
        chunks.c.status.in_(ChunkStatus.closed()),
        chunks.c.finished_at.is_not(None),
    )
    first, last = progress.first_started, progress.last_finished
    if last is None:
        return 1.0, []
    start = min(x for x in (job.started_at, first, last) if x is not None)
    width = bucket_width((last - start).total_seconds())
    n = int((last - start).total_seconds() // width) + 1
    buckets = [Bucket(start=start + timedelta(seconds=i * width)) for i in range(n)]
    offset = _epoch(session, chunks.c.finished_at) - start.timestamp()
    if core(session).dialect.name == "postgresql":
        index = cast(func.floor(offset / width), Integer)
    else:  # CAST truncates toward zero: floor, for the offsets that are not negative
        index = cast(offset / width, Integer)
    done = func.coalesce(chunks.c.requests_succeeded + chunks.c.requests_failed, chunks.c.requests_total)
    rows = session.execute(
        select(index, func.sum(done), func.coalesce(func.sum(chunks.c.output_tokens), 0))
        .where(finished)
        .group_by(index)
    ).all()
    for i, done_requests, tokens in rows:
        b = buckets[min(n - 1, max(0, int(i)))]
        b.requests += int(done_requests or 0)
        b.output_tokens += int(tokens or 0)
    for b in buckets:
        b.tokens_per_s = b.output_tokens / width
    return width, buckets


def _sample_rows(
    session: Connection | Session, job_id: int, sample: Sample, *, several_tasks: bool
) -> list[tuple[Any, ...]]:
    """The sampled chunks' requests and every sample of their results: (request id, task,
    sample index, status, input tokens, output tokens, latency, valid, format kind, label of a
    valid answer); the result columns None for a request without a result, the task None
    unless ``several_tasks``. The results are
    looked up by their unique key (job, request) for the sample's request ids
    (``control.keyed_rows``: one or a few statements)."""
    kind = results.c.params_json["output_format"]["kind"].as_string()
    stmt = select(
        results.c.request_id,
        results.c.sample_index,
        results.c.status,
        results.c.input_tokens,
        results.c.output_tokens,
        results.c.latency_ms,
        results.c.valid,
        kind,
        case((results.c.valid.is_(True), results.c.output_text)),  # a label: only valid answers
    ).where(results.c.job_id == job_id)
    ids = sample.request_ids(session)
    # A request's task: only a job of several tasks needs it (OpenAI input), from the primary key.
    tasks: dict[int, str | None] = (
        dict(keyed_rows(session, select(requests.c.id, requests.c.task), requests.c.id, ids))
        if several_tasks
        else dict.fromkeys(ids)
    )
    found = keyed_rows(session, stmt, results.c.request_id, ids)
    rows: list[tuple[Any, ...]] = [(rid, tasks[rid], *rest) for rid, *rest in found]
    answered = {r[0] for r in rows}
    rows += [(rid, task, *(None,) * 8) for rid, task in tasks.items() if rid not in answered]
    return rows


def _sampled_structured(rows: list[tuple[Any, ...]]) -> StructuredAnswers | None:
    answers = valid = 0
    labels: dict[str, int] = {}
    for _, _, _, status, _, _, _, ok, kind, text in rows:
        if status != ResultStatus.SUCCEEDED.value or ok is None:
            continue
        answers += 1
        if ok:
            valid += 1
            if kind == "choice":
                labels[str(text)] = labels.get(str(text), 0) + 1
    if not answers:
        return None
    ranked = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    rest = sum(n for _, n in ranked[TOP_LABELS:])
    top = ranked[:TOP_LABELS]
    return StructuredAnswers(
        answers=answers,
        valid=valid,
        valid_share=valid / answers,
        labels=[*top, ("(other)", rest)] if rest else top,
    )


def _sampled_corpus(session: Connection | Session, job_id: int, sample: Sample) -> dict[str, float]:
    """Corpus chrF / BLEU of the sampled chunks' succeeded answers (sample 0) that have a
    reference (sentence statistics summed, as ``metrics.corpus_scores`` does for a job); the
    references and the answers looked up by key (``control.keyed_rows``)."""
    ids = sample.request_ids(session)
    with_ref = select(requests.c.id, requests.c.reference).where(requests.c.reference.is_not(None))
    refs = dict(keyed_rows(session, with_ref, requests.c.id, ids))
    answers = select(results.c.request_id, results.c.output_text).where(
        results.c.job_id == job_id,
        results.c.sample_index == 0,
        results.c.status == ResultStatus.SUCCEEDED.value,
    )
    texts = dict(keyed_rows(session, answers, results.c.request_id, [i for i in ids if i in refs]))
    pairs = [(texts[i] or "", str(refs[i])) for i in ids if i in texts]
    if not pairs:
        return {}
    from sacrebleu.metrics import BLEU, CHRF

    out: dict[str, float] = {}
    for name, metric in {"corpus_chrf": CHRF(), "corpus_bleu": BLEU()}.items():
        stats = metric._extract_corpus_statistics([h for h, _ in pairs], [[r for _, r in pairs]])
        out[name] = float(
            metric._compute_score_from_stats([sum(col) for col in zip(*stats, strict=True)]).score
        )
    return out


def _sampled_report(db: Database, job: JobRow) -> JobReport:
    one_task = job.input_format == "native"  # every request runs under the job's task
    with db.connection() as s:
        progress: Progress = job_progress(s, [job.id])[job.id]
        rejected = s.scalar(select(func.count()).where(rejects.c.job_id == job.id)) or 0
        width, buckets = _chunk_throughput(s, job, progress)
        sample = sample_of(s, job.id, progress, job.requests_total)
        rows = _sample_rows(s, job.id, sample, several_tasks=not one_task)
        means = bounded_mean_scores(s, job.id, progress, job.requests_total, sample)
        scores = means.scores if means.sampled else None
        corpus = _sampled_corpus(s, job.id, sample) if job.task in CORPUS_METRICS else {}
    sampled = ["latency"]
    per_task: dict[str, _Acc] = {}
    total = _Acc("all")
    for _, task, idx, status, tin, tout, ms, *_ in rows:
        if idx not in (0, None):  # a request's figures are those of its sample 0, as for a small job
            continue
        total.add(status, tin, tout, ms)
        if not one_task:
            acc = per_task.get(task)
            if acc is None:
                acc = per_task[task] = _Acc(task)
            acc.add(status, tin, tout, ms)
    lat = sorted(total.lat)
    p99 = percentile(lat, 0.99) or 0.0
    totals = Figures(
        task="all",
        requests=job.requests_total,
        succeeded=progress.succeeded,
        failed=progress.failed,
        pending=max(0, job.requests_total - progress.succeeded - progress.failed),
        input_tokens=progress.input_tokens,
        output_tokens=progress.output_tokens,
        latency_ms=latency_of(total.lat),
    )
    tasks = sorted(per_task)
    if one_task:  # the job's one task: its row is the totals
        per_task_figs = [replace(totals, task=job.task)]
    else:
        per_task_figs = [per_task[t].done() for t in tasks]
        sampled.append("per_task")
    structured = _sampled_structured(rows)
    if structured is not None:
        sampled.append("structured")
    hists: dict[str, Histogram] = {}
    if scores is None:
        hists = _score_histograms(db, job.id)  # at most control.SCORE_EXACT_LIMIT rows
    else:
        sampled += ["scores", "score_histograms"]
        hists = score_histograms((metric, value) for _, metric, value in scores)
    if corpus:
        sampled.append("corpus_scores")
    return JobReport(
        **_job_fields(job, rejected),
        totals=totals,
        per_task=per_task_figs,
        bucket_s=width,
        throughput=buckets,
        latency_histogram=histogram(lat, 0.0, p99 if p99 > 0 else 1.0, LATENCY_BINS),
        failures=_failures(db, job.id, totals.failed),
        scores=means.means,
        corpus_scores=corpus,
        score_histograms=hists,
        structured=structured,
        sample=SampleInfo(
            requests=len({r[0] for r in rows}),
            chunks=sample.chunks,
            chunks_closed=sample.chunks_closed,
            figures=sampled,
        ),
    )
