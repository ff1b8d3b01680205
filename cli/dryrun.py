"""``lmjobs submit --dry-run``: load the model's tokenizer, call the estimate, render it.

Nothing is written: not the job, not the schema (an embedded SQLite database that does not
exist yet is not created; history is simply unknown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from lmjobs.cli import context, render
from lmjobs.db.session import Database, get_database, is_sqlite
from lmjobs.jobs.errors import ModelLoadError
from lmjobs.jobs.estimate import Estimate, Tokenizer, estimate_file
from lmjobs.jobs.settings import Settings


def load_tokenizer(model: str, settings: Settings) -> Tokenizer:
    """The model's tokenizer as a counter, or a marked guess when it cannot be loaded."""
    from lmjobs.worker.token_count import load_token_counter

    assert settings.model_cache is not None
    render.err.print(f"reading the tokenizer of {model} ...", highlight=False)
    try:
        counter = load_token_counter(
            model, cache_dir=settings.model_cache, trust_remote_code=settings.trust_remote_code
        )
    except ModelLoadError as exc:
        return Tokenizer(count=None, note=f"guess: chars / 4 ({exc})")
    return Tokenizer(
        count=counter,
        context_length=counter.context_length,
        is_seq2seq=counter.is_seq2seq,
        note=f"tokenizer of {model}",
    )


def history_database(settings: Settings) -> Database | None:
    """The configured database for past throughput, without creating or migrating it."""
    url = settings.database_url
    if is_sqlite(url):
        path = make_url(url).database
        if not path or path == ":memory:" or not Path(path).is_file():
            return None
    return get_database(url)


def show(file: Path, opts: Any, *, as_json: bool) -> None:
    """``opts`` is the SubmitOptions the real submit would use."""
    s = context.settings()
    est = estimate_file(
        Path(file),
        task=opts.task,
        model=opts.model,
        params=dict(opts.params),
        tokenizer=load_tokenizer(opts.model, s),
        history=history_database(s),
        max_line_bytes=opts.max_line_bytes,
    )
    if as_json:
        render.dump_json({**est.to_json(), "submitted": False})
        return
    _table(est)


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _lines(lines: list[int], total: int) -> str:
    if not lines:
        return ""
    more = f", ... {total - len(lines)} more" if total > len(lines) else ""
    word = "line" if total == 1 else "lines"
    return f" ({word} {', '.join(map(str, lines))}{more})"


def _table(est: Estimate) -> None:
    approx = "≈ " if est.tokens_guessed else ""
    over = f"{_num(est.over_context)}{_lines(est.over_context_lines, est.over_context)}"
    if est.truncated:
        over += f"; {_num(est.truncated)} would be truncated"
    expected = (
        f"{_num(est.expected_tokens_out)} expected" if est.expected_tokens_out is not None else "unknown"
    )
    render.kv_table(
        f"dry run: {est.file} ({est.task}, {est.model}) - nothing submitted",
        {
            "lines": _num(est.lines),
            "accepted": _num(est.accepted),
            "rejected": _num(est.rejected),
            "duplicate ids": f"{_num(est.duplicate_ids)}" + _lines(est.duplicate_id_lines, est.duplicate_ids),
            "duplicate prompts": _num(est.duplicate_prompts),
            "tokens in": f"{approx}{_num(est.tokens_in)} (longest {approx}{_num(est.tokens_in_max)})",
            "  counted with": est.tokens_basis,
            "context length": _num(est.context_length) if est.context_length else "unknown",
            "over the context": over if est.context_length else "unknown",
            "tokens out": f"{_num(est.max_new_tokens_total)} at most; {expected}",
            "  from": est.output_basis,
            "throughput": f"{est.tokens_per_s:,.1f} output tokens/s" if est.tokens_per_s else "-",
            "  from ": est.throughput_basis,
            "run time": render.duration(est.run_time_s),
            "  how": est.run_time_basis,
        },
    )
    for reason, n in est.reject_reasons.items():
        render.warn(f"{n} rejected: {reason}")
