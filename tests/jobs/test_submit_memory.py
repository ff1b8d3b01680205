"""Submit streams its file: memory does not grow with the number of lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmjobs.bench.harness import cli_env
from lmjobs.bench.ingest import timed, write_file

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_submit_memory_stays_flat_from_20_000_to_200_000_lines(
    tmp_path: Path, lmjobs_home: Path, redis_url: str
) -> None:
    peaks = {}
    for lines in (20_000, 200_000):
        path = tmp_path / f"in{lines}.jsonl"
        write_file(path, lines)
        env = cli_env(
            LMJOBS_HOME=str(lmjobs_home),
            LMJOBS_DATABASE_URL=f"sqlite:///{tmp_path / f'{lines}.db'}",
            LMJOBS_BROKER_URL=redis_url,
        )
        _, peaks[lines], out = timed(["submit", str(path), "--task", "summarize", "--json"], env)
        assert f'"requests": {lines}' in out
    assert peaks[200_000] < 250, peaks  # MB: a fixed ceiling, whatever the file's size
    assert peaks[200_000] - peaks[20_000] < 40, peaks  # ten times the lines, the same memory
