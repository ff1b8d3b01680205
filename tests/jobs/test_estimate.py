"""`submit --dry-run`: exact counts for a file with known contents, history from past jobs,
the real tokenizer's counts equal the engine's, and nothing is written."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from analytics_data import submit_and_run, write_jsonl
from sqlalchemy import func, select, update

from lmjobs.db.models import Base, Chunk, Result
from lmjobs.db.session import Database, get_database
from lmjobs.jobs.engine_api import GenRequest
from lmjobs.jobs.errors import InputFileError, ModelLoadError
from lmjobs.jobs.estimate import GUESS_TOKENS_PER_S, Tokenizer, estimate_file

PARAMS = {"max_new_tokens": 10}


def words(requests: Sequence[GenRequest]) -> list[int]:
    """A tokenizer whose count is known by eye: one token per word of the prompt."""
    return [len((r.prompt or "").split()) for r in requests]


KNOWN = Tokenizer(count=words, context_length=20, note="words")

# generate task: the prompt is the line's prompt, unchanged.
LINES = [
    {"id": "a", "prompt": "one two three"},  # 3 tokens
    {"id": "b", "prompt": "one two three"},  # 3, the same prompt as a
    {"id": "a", "prompt": "four five"},  # duplicate id: rejected
    "{not json",  # rejected
    {"id": "c"},  # no prompt: rejected
    {"id": "d", "prompt": " ".join(["w"] * 15)},  # 15 + 10 > 20: over the context
    {"id": "e", "prompt": "six", "max_new_tokens": 2},  # 1 token, 2 out
    {"id": "f", "prompt": "one two three", "temperature": 0.5},  # other params: not a duplicate
    {"id": "g", "prompt": " ".join(["x"] * 12), "max_new_tokens": 8},  # 12 + 8 fits exactly
]


def test_known_file_gives_known_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", LINES)
    est = estimate_file(path, task="generate", model="m", params=PARAMS, tokenizer=KNOWN)
    assert (est.lines, est.accepted, est.rejected) == (9, 6, 3)
    assert (est.duplicate_ids, est.duplicate_id_lines) == (1, [3])
    assert est.duplicate_prompts == 1
    assert est.tokens_in == 3 + 3 + 15 + 1 + 3 + 12 and est.tokens_in_max == 15
    assert est.max_new_tokens_total == 10 + 10 + 10 + 2 + 10 + 8
    assert (est.over_context, est.over_context_lines, est.truncated) == (1, [6], 0)
    assert est.context_length == 20 and est.tokens_basis == "words" and not est.tokens_guessed
    assert sum(est.reject_reasons.values()) == 3
    assert "duplicate id 'a'" in est.reject_reasons
    assert [r["line_number"] for r in est.rejects] == [3, 4, 5]
    # No history: the upper bound and a guessed throughput, both said to be so.
    assert est.expected_tokens_out is None and "upper bound" in est.output_basis
    assert est.tokens_per_s == GUESS_TOKENS_PER_S and est.throughput_basis.startswith("guess")
    assert est.run_time_s == pytest.approx(50 / GUESS_TOKENS_PER_S)
    assert est.run_time_basis.startswith("GUESS")


def test_truncate_and_guessed_tokens(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", LINES)
    est = estimate_file(
        path, task="generate", model="m", params={**PARAMS, "truncate": True}, tokenizer=KNOWN
    )
    assert (est.over_context, est.truncated) == (0, 1)
    guess = estimate_file(path, task="generate", model="m", params=PARAMS, tokenizer=Tokenizer(count=None))
    assert guess.tokens_guessed and guess.context_length is None and guess.over_context == 0
    assert guess.tokens_in == 4 + 4 + 8 + 1 + 4 + 6  # ceil(chars / 4) per prompt
    with pytest.raises(InputFileError, match="no such file"):
        estimate_file(tmp_path / "nope", task="generate", model="m", params={}, tokenizer=KNOWN)


def _counts(db: Database) -> dict[str, int]:
    with db.session() as s:
        return {
            t.name: s.scalar(select(func.count()).select_from(t)) or 0 for t in Base.metadata.sorted_tables
        }


def test_history_gives_expected_tokens_and_run_time(db_url: str, tmp_path: Path) -> None:
    db = get_database(db_url)
    past = write_jsonl(tmp_path / "past.jsonl", [{"prompt": f"a b c d {i}"} for i in range(8)])
    job = submit_and_run(db, past, "generate", params={"max_new_tokens": 20})
    with db.session() as s:  # every past chunk busy for exactly 2 s
        chunks = list(s.scalars(select(Chunk).where(Chunk.job_id == job)))
        for c in chunks:
            s.execute(
                update(Chunk).where(Chunk.id == c.id).values(finished_at=c.started_at + timedelta(seconds=2))
            )
        out = s.scalar(select(func.sum(Result.output_tokens)).where(Result.job_id == job))
    assert out and len(chunks) == 2
    ratio, rate = out / (8 * 20), out / (2 * 2.0)

    before = _counts(db)
    path = write_jsonl(tmp_path / "in.jsonl", LINES)
    est = estimate_file(path, task="generate", model="fake", params=PARAMS, tokenizer=KNOWN, history=db)
    assert _counts(db) == before  # a dry run writes nothing
    assert est.output_ratio == pytest.approx(ratio)
    assert est.expected_tokens_out == round(50 * ratio)
    assert est.tokens_per_s == pytest.approx(rate)
    assert est.throughput_basis.startswith("measured") and "2 past chunks" in est.throughput_basis
    assert est.run_time_s == pytest.approx(round(50 * ratio) / rate)
    other = estimate_file(path, task="generate", model="another", params=PARAMS, tokenizer=KNOWN, history=db)
    assert other.expected_tokens_out is None and other.throughput_basis.startswith("guess")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # with and without a chat template
def test_tokenizer_counts_equal_the_engine(tmp_path: Path, arch: str) -> None:
    from tiny_models import build_tiny_causal
    from transformers import AutoConfig, AutoTokenizer

    from lmjobs.worker.engine.batching import tokenize
    from lmjobs.worker.models import context_length
    from lmjobs.worker.token_count import load_token_counter

    folder = build_tiny_causal(tmp_path / arch, arch=arch)
    counter = load_token_counter(str(folder), cache_dir=tmp_path)
    reqs = [
        GenRequest(key=1, prompt="The quick brown fox jumps over the lazy dog."),
        GenRequest(
            key=2,
            prompt="x",
            messages=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Wie geht es dir?"},
            ),
        ),
    ]
    tok = AutoTokenizer.from_pretrained(folder)
    assert counter(reqs) == [len(ids) for ids in tokenize(reqs, tok)]
    assert counter.context_length == context_length(AutoConfig.from_pretrained(folder), tok)
    assert not counter.is_seq2seq


def test_tokenizer_that_cannot_load_is_a_one_line_error(tmp_path: Path) -> None:
    from lmjobs.worker.token_count import load_token_counter

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_token_counter(str(tmp_path / "missing" / "model"), cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="from disk"):
        load_token_counter("surely-not-cached/model-xyz", cache_dir=tmp_path)


def test_samples_multiply_the_tokens_out_bound(tmp_path: Path) -> None:
    lines = [{"id": "a", "prompt": "one two", "n": 3}, {"id": "b", "prompt": "three"}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    est = estimate_file(path, task="generate", model="m", params=PARAMS, tokenizer=KNOWN)
    assert est.max_new_tokens_total == 3 * 10 + 10  # each of a's three samples writes its own
    assert est.tokens_in == 2 + 1  # a prompt is read once, whatever its samples
