"""The ingest benchmark: submit, status and every export format of an N-line file, on SQLite
and PostgreSQL, each a real ``lmjobs`` process timed whole (start-up included).

    python -m lmjobs.bench.ingest --lines 1000000 [--postgres URL] [--json-out FILE] [--formats csv,parquet]

It writes a summarize file of 20-60 words per line, runs ``lmjobs submit`` (its first chunk
messages go to ``--broker``, which is flushed at the end; no worker runs), fills every
request's result with one SQL statement (what workers would have written; generation is not
what this measures), then times
``lmjobs status`` and ``lmjobs results --format F`` for each format. Peak memory is the
process's maximum resident set. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmjobs.bench.harness import LMJOBS, cli_env

FORMATS = ("jsonl", "csv", "parquet", "openai")
WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which be this had "
    "not or have but one their all model batch queue worker result chunk export translate summary"
).split()
FILL_RESULTS = (
    "INSERT INTO results (job_id, request_id, status, output_text, finish_reason, input_tokens,"
    " output_tokens, latency_ms, model, dtype, device, params_json, template_version, worker, attempt,"
    " deduplicated, created_at) SELECT job_id, id, 'succeeded', 'summary of ' || custom_id, 'stop', 40,"
    " 12, 100.0, 'm', 'float32', 'cpu', '{}', 'summarize/v2', 'w', 1, false, CURRENT_TIMESTAMP"
    " FROM requests WHERE job_id = :job"
)


def write_file(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            fh.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")


# Forks and execs the command from a small process, then writes the command's peak RSS (KB)
# to the file named first. Measured from the benchmark's own process instead, Linux reports
# at least the RSS the child inherited at fork (a pytest process with torch loaded: ~870 MB).
_PEAK_OF = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``lmjobs ARGS``; (seconds, peak resident MB of that process alone, stdout)."""
    with tempfile.TemporaryDirectory() as tmp:
        peak, out, err = Path(tmp) / "peak", Path(tmp) / "out", Path(tmp) / "err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            t0 = time.perf_counter()
            code = subprocess.call(
                [sys.executable, "-c", _PEAK_OF, str(peak), *LMJOBS, *args],
                env=env,
                stdout=stdout,
                stderr=stderr,
            )
            elapsed = time.perf_counter() - t0
        if code != 0:
            tail = err.read_text(errors="replace").strip()[-500:]
            raise SystemExit(f"lmjobs {' '.join(args)} exited {code}: {tail}")
        return elapsed, int(peak.read_text()) / 1024, out.read_text()


def run_backend(
    name: str, url: str, path: Path, lines: int, home: Path, broker: str, formats: tuple[str, ...] = FORMATS
) -> dict[str, Any]:
    from sqlalchemy import text

    from lmjobs.db.session import get_database

    home.mkdir(parents=True, exist_ok=True)
    env = cli_env(
        keep_lmjobs=False,
        LMJOBS_HOME=str(home),
        LMJOBS_DATABASE_URL=url,
        LMJOBS_BROKER_URL=broker,  # submit dispatches its first window; no worker takes it
    )
    if not url.startswith("sqlite"):
        timed(["db", "upgrade"], env)
    out: dict[str, Any] = {"backend": name, "lines": lines, "steps": {}}
    seconds, peak, stdout = timed(["submit", str(path), "--task", "summarize", "--json"], env)
    job = json.loads(stdout)["job_id"]
    out["steps"]["submit"] = {"seconds": seconds, "per_s": lines / seconds, "peak_mb": peak}
    db = get_database(url)
    t0 = time.perf_counter()
    with db.session() as s:
        s.execute(text(FILL_RESULTS), {"job": job})
    out["fill_results_s"] = time.perf_counter() - t0
    seconds, peak, _ = timed(["status", str(job), "--json"], env)
    out["steps"]["status"] = {"seconds": seconds, "peak_mb": peak}
    for fmt in formats:
        target = home / f"out.{fmt}"
        seconds, peak, _ = timed(["results", str(job), "--format", fmt, "-o", str(target), "--force"], env)
        out["steps"][f"export {fmt}"] = {"seconds": seconds, "per_s": lines / seconds, "peak_mb": peak}
    return out


def _formats(value: str) -> tuple[str, ...]:
    chosen = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(FORMATS)} (got {value!r})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--postgres", default="", help="an empty PostgreSQL database URL (skipped if not given)")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="a Redis database this may flush")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument(
        "--formats",
        type=_formats,
        default=FORMATS,
        help=f"the export formats to time, comma-separated (default: {','.join(FORMATS)})",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lmjobs-ingest-") as tmp:
        root = Path(tmp)
        path = root / "in.jsonl"
        write_file(path, args.lines)
        sqlite_url = f"sqlite:///{root / 'sqlite.db'}"
        runs = [
            run_backend("sqlite", sqlite_url, path, args.lines, root / "sqlite", args.broker, args.formats)
        ]
        if args.postgres:
            pg = run_backend(
                "postgresql", args.postgres, path, args.lines, root / "pg", args.broker, args.formats
            )
            runs.append(pg)
        import redis

        redis.Redis.from_url(args.broker).flushdb()  # the chunk messages nobody will take
    print(f"{args.lines:,} lines, each step a whole lmjobs process (start-up included)")
    print(f"{'step':<16}" + "".join(f"{r['backend']:>28}" for r in runs))
    for step in runs[0]["steps"]:
        cells = []
        for r in runs:
            st = r["steps"][step]
            rate = f" {st['per_s']:>9,.0f}/s" if "per_s" in st else " " * 12
            cells.append(f"{st['seconds']:>7.1f} s{rate} {st['peak_mb']:>5.0f} MB")
        print(f"{step:<16}" + "".join(f"{c:>28}" for c in cells))
    if args.json_out:
        args.json_out.write_text(json.dumps({"lines": args.lines, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
