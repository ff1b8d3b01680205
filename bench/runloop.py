"""``lmjobs run`` against the loop people write first (issue 12's end-to-end CPU target).

    python -m lmjobs.bench.runloop [--prompts 160] [--loop-prompts 16] [--new-tokens 32]
                                   [--fp32-run] [--repeat N] [--json-out FILE]

Writes ``--prompts`` plain prompts of 12 to 45 tokens (seeded word salad of exact token
counts, ``generate`` task lines), then measures, side by side in one run:

- **loop**: the tutorial loop over the first ``--loop-prompts`` prompts: one prompt at a
  time, the model in fp32, ``model.generate(do_sample=False, max_new_tokens=N)``, decode
  (``bench.arms.run_naive``, the benchmark's A0). Timed from the first prompt to the last
  answer, after a short warm-up; loading the model is not counted (in the loop's favour).
- **run**: ``lmjobs run prompts.jsonl --task generate --max-new-tokens N`` as a new process
  with default settings (dtype ``auto``, the embedded default: SQLite in a fresh
  ``LMJOBS_HOME``, no Redis), timed whole: start-up, loading the model, every chunk, the
  results written and printed. Output tokens are summed from its results file.
- **run fp32** (``--fp32-run``): the same with ``LMJOBS_DTYPE=float32``.

With ``--repeat N`` every arm runs N times, the arms alternated, and keeps its fastest
round (the machine's noise only ever slows a run down); the JSON lists every round.

Each row has output tokens/s, its ratio to the loop's, how many of the loop's answers it
matches exactly (greedy text; the loop is fp32, so a bf16 run's differences are rounding,
listed by request), and its fraction of this machine's measured matmul rate in the dtype it
used: ``2 x (the model's matmul parameters) x (prompt + output tokens)`` over its wall time,
attention left out (these prompts are short). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmjobs.bench.arms import run_naive
from lmjobs.bench.harness import LMJOBS, cli_env
from lmjobs.bench.measure import load_average, matmul_flops, matmul_rate
from lmjobs.bench.workloads import BenchRequest, TextMaker, _bench_request
from lmjobs.jobs.engine_api import GenRequest, SamplingParams
from lmjobs.worker.models import load_model

PROMPT_TOKENS = (12, 45)


def make_prompts(tokenizer: Any, n: int, new_tokens: int, *, seed: int = 0) -> list[BenchRequest]:
    """``n`` plain prompts of 12-45 tokens each (the tokenizer's special tokens included)."""
    maker = TextMaker(tokenizer, seed)
    rng = random.Random(seed + 3)
    out = []
    for key in range(n):
        text = maker.exact(rng.randint(*PROMPT_TOKENS), add_special=True)
        gen = GenRequest(key=key, prompt=text, params=SamplingParams(max_new_tokens=new_tokens))
        out.append(_bench_request(key, gen, tokenizer, "generate", {"prompt": text}))
    return out


def write_file(requests: Sequence[BenchRequest], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps({"id": str(r.key), "prompt": r.job_line["prompt"]}) + "\n")


def run_loop(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> dict[str, Any]:
    run_naive(model, tokenizer, [replace(r, max_new_tokens=4) for r in requests[:1]])  # warm-up, untimed
    start = time.perf_counter()
    out = run_naive(model, tokenizer, requests)
    elapsed = time.perf_counter() - start
    return {
        "requests": len(requests),
        "output_tokens": out.output_tokens,
        "prompt_tokens": sum(r.input_tokens for r in requests),
        "elapsed_s": elapsed,
        "texts": {str(k): v for k, v in out.texts.items()},
        "dtype": "float32",
    }


def run_cli(
    file: Path, new_tokens: int, *, model: str, model_cache: Path, dtype: str | None, workdir: Path
) -> dict[str, Any]:
    """``lmjobs run`` as a fresh process; the whole process is timed."""
    home = Path(tempfile.mkdtemp(prefix="lmjobs-runloop-", dir=workdir))
    out_file = home / "out.jsonl"
    overrides = {"LMJOBS_HOME": str(home), "LMJOBS_MODEL": model, "LMJOBS_MODEL_CACHE": str(model_cache)}
    if dtype:
        overrides["LMJOBS_DTYPE"] = dtype
    env = cli_env(keep_lmjobs=False, **overrides)
    args = [*LMJOBS, "run", str(file), "--task", "generate", "--max-new-tokens", str(new_tokens)]
    args += ["--output", str(out_file)]
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lmjobs run exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines() if line]
    failed = [r for r in rows if r.get("status") != "succeeded"]
    if failed:
        raise SystemExit(f"lmjobs run: {len(failed)} requests failed, e.g. {failed[0].get('error')}")
    return {
        "requests": len(rows),
        "output_tokens": sum(int(r["output_tokens"]) for r in rows),
        "prompt_tokens": sum(int(r["input_tokens"]) for r in rows),
        "elapsed_s": elapsed,
        "texts": {str(r["custom_id"]): r["output_text"] for r in rows},
        "dtype": ",".join(sorted({str(r.get("dtype")) for r in rows})),
    }


def compare(loop_texts: dict[str, str], texts: dict[str, str]) -> dict[str, Any]:
    keys = sorted(loop_texts, key=int)
    differ = [k for k in keys if texts.get(k) != loop_texts[k]]
    return {"identical": len(keys) - len(differ), "of": len(keys), "differ": differ}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="lmjobs-runloop-"))
    report: dict[str, Any] = {
        "settings": {
            "prompts": args.prompts,
            "loop_prompts": args.loop_prompts,
            "new_tokens": args.new_tokens,
            "model": args.model,
            "threads": torch.get_num_threads(),
            "repeat": args.repeat,
        },
        "load_average_start": load_average(),
    }
    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=args.model_cache)
    model, tokenizer = loaded.model, loaded.tokenizer
    requests = make_prompts(tokenizer, args.prompts, args.new_tokens, seed=args.seed)
    file = workdir / "prompts.jsonl"
    write_file(requests, file)
    report["workload"] = {
        "prompt_tokens": sum(r.input_tokens for r in requests),
        "prompt_tokens_min_max": [
            min(r.input_tokens for r in requests),
            max(r.input_tokens for r in requests),
        ],
    }
    rates = {
        name: matmul_rate(torch.device("cpu"), dt)
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    report["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}
    params = (
        matmul_flops(model, prompt_tokens=1, output_tokens=0),
        matmul_flops(model, prompt_tokens=0, output_tokens=1),
    )
    report["flops_per_token"] = {"prompt": params[0], "output": params[1]}

    # every arm runs --repeat times, the arms alternated; each keeps its fastest round (the
    # outputs are the same every round: greedy), and the JSON keeps every round's seconds
    runs: dict[str, list[dict[str, Any]]] = {}
    dtypes = {"run": None, **({"run fp32": "float32"} if args.fp32_run else {})}
    for round_ in range(args.repeat):
        print(
            f"round {round_ + 1}/{args.repeat}: loop over {args.loop_prompts} prompts, fp32 ...",
            file=sys.stderr,
        )
        runs.setdefault("loop", []).append(run_loop(model, tokenizer, requests[: args.loop_prompts]))
        for name, dtype in dtypes.items():
            print(f"round {round_ + 1}/{args.repeat}: {name}, {args.prompts} prompts ...", file=sys.stderr)
            runs.setdefault(name, []).append(
                run_cli(
                    file,
                    args.new_tokens,
                    model=args.model,
                    model_cache=args.model_cache,
                    dtype=dtype,
                    workdir=workdir,
                )
            )
    arms: dict[str, dict[str, Any]] = {}
    for name, rounds in runs.items():
        arms[name] = dict(min(rounds, key=lambda r: r["elapsed_s"]))
        arms[name]["rounds_s"] = [round(r["elapsed_s"], 2) for r in rounds]
    base = arms["loop"]["output_tokens"] / arms["loop"]["elapsed_s"]
    for name, arm in arms.items():
        arm["tokens_per_s"] = arm["output_tokens"] / arm["elapsed_s"]
        arm["x_loop"] = arm["tokens_per_s"] / base
        dtype = arm["dtype"]
        flops = params[0] * arm["prompt_tokens"] + params[1] * arm["output_tokens"]
        arm["matmul_fraction"] = flops / arm["elapsed_s"] / rates[dtype] if dtype in rates else None
        if name != "loop":
            arm["same_as_loop"] = compare(arms["loop"]["texts"], arm["texts"])
    report["arms"] = arms
    report["target"] = {"x_loop": 15.0, "met": arms["run"]["x_loop"] >= 15.0}
    report["load_average_end"] = load_average()
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        "| arm | requests | dtype | prompt tokens | out tokens | seconds | tokens/s | x loop"
        " | same as loop | matmul rate used |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in report["arms"].items():
        same = a.get("same_as_loop")
        dtype = a["dtype"]
        frac = a.get("matmul_fraction")
        lines.append(
            f"| {name} | {a['requests']} | {dtype} | {a['prompt_tokens']:,} | {a['output_tokens']:,}"
            f" | {a['elapsed_s']:.1f} | {a['tokens_per_s']:.1f} | {a['x_loop']:.2f}"
            f" | {_same(same)} | {_percent(frac)} |"
        )
    rates = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_gflops"].items())
    lines.append("")
    load = f"{report['load_average_start']} -> {report['load_average_end']}"
    lines.append(f"matmul rate measured: {rates}; load average {load}")
    for name, a in report["arms"].items():
        same = a.get("same_as_loop")
        if same and same["differ"]:
            lines.append(f"{name} differs from the loop on requests {', '.join(same['differ'])}")
    return "\n".join(lines)


def _same(same: dict[str, Any] | None) -> str:
    return f"{same['identical']}/{same['of']}" if same else "-"


def _percent(fraction: float | None) -> str:
    return f"{100 * fraction:.1f}%" if fraction is not None else "-"


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m lmjobs.bench.runloop", description=doc.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--loop-prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    default_cache = os.environ.get("LMJOBS_MODEL_CACHE") or str(Path.home() / ".lmjobs" / "models")
    ap.add_argument("--model-cache", type=Path, default=Path(default_cache))
    ap.add_argument("--fp32-run", action="store_true", help="also run lmjobs with LMJOBS_DTYPE=float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the loop (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds of every arm, alternated; the fastest counts"
    )
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if not 1 <= args.loop_prompts <= args.prompts:
        ap.error("--loop-prompts must be between 1 and --prompts")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    report = run(args)
    print(table(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
