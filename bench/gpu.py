"""``python -m lmjobs.bench.gpu``: the benchmark's in-process arms with nothing but torch,
transformers and tokenizers (and the standard library) installed.

The GPU machine's image has no pydantic, SQLAlchemy, Celery or Redis, so ``lmjobs bench``
(the CLI reads its settings through pydantic) cannot start there. This entry point runs
the same ``run_bench`` on the same presets (``gpu`` by default): A0, A1, A2, A3, A5, A6 in
process; E2E is skipped with the reason when its modules are missing, A4 when torchao is.
It prints the arms as a Markdown table, the skipped arms, the notes and the targets, and
writes the JSON report (rewritten after every arm) to ``--json-out``.

Without an install, ``python bench/launch.py ...`` runs this module from a checkout (see
``bench/launch.py``); docs/benchmarks.md has the exact command for the device machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from lmjobs.bench.table import fmt, markdown, speed_warning


def _parser() -> argparse.ArgumentParser:
    summary = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m lmjobs.bench.gpu", description=summary)
    p.add_argument("--preset", default="gpu", help="a preset of lmjobs.bench.config (default gpu)")
    p.add_argument("--model", help="alias, folder, Hugging Face id or random:<shape>")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--workload")
    p.add_argument("--requests", type=int)
    p.add_argument("--a0-requests", type=int)
    p.add_argument("--a1-requests", type=int)
    p.add_argument("--arms", help="comma-separated arms or aliases")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--naive-batch", type=int, help="A1's batch size")
    p.add_argument("--warmup", choices=("short", "shapes"))
    p.add_argument("--threads", type=int)
    p.add_argument("--budget-s", type=float)
    p.add_argument("--cb-limit-s", type=float, help="A6 gives up after this many seconds of one call")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LMJOBS_MODEL_CACHE") or Path.home() / ".lmjobs" / "models"),
        help="where random models are built (default $LMJOBS_MODEL_CACHE or ~/.lmjobs/models)",
    )
    p.add_argument("--json-out", type=Path)
    return p


def environment() -> dict[str, Any]:
    """Versions and the device, printed first: what the figures were measured on."""
    import tokenizers
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def render(report: dict[str, Any]) -> str:
    meta, work = report["meta"], report["workload"]
    lines = [
        f"model {meta['model']} ({meta['device']}, {meta['dtype']}, {meta['threads']} threads); "
        f"workload {work['name']}: {work['requests']} requests, {work['input_tokens']} input "
        f"tokens, up to {work['max_new_tokens']} new",
        "",
        markdown(report),
        "",
    ]
    lines += [f"{a['arm']}: {a['label']}" for a in report["arms"]]
    unsteady = speed_warning(report["meta"])
    if unsteady:
        lines.append(unsteady)
    for arm in report["arms"]:
        same = arm["correctness_vs_a0"]
        if same and same["differing_keys"]:
            lines.append(f"{arm['arm']} differs from A0 on requests {same['differing_keys']}")
        lines += [f"{arm['arm']}: {note}" for note in arm["notes"]]
        warm = arm.get("warmup") or {}
        if warm:
            lines.append(
                f"{arm['arm']} warm-up: {warm['requests']} requests, {arm['warmup_s']} s; "
                f"timed decode shapes not warmed: {warm['decode_shapes_not_warmed']} "
                f"of {warm['decode_shapes_timed']}"
            )
    lines += [f"{arm} skipped: {why}" for arm, why in report["skipped"].items()]
    for t in report["targets"]:
        met = "yes" if t["met"] else "no"
        needed, measured = fmt(t["target"], 2), fmt(t["measured"], 2)
        lines.append(f"target {t['name']}: needed {needed}, measured {measured}: {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.time()
    env = environment()
    print("environment: " + json.dumps(env), flush=True)

    from lmjobs.bench.config import preset_config
    from lmjobs.bench.runner import run_bench

    try:
        config = preset_config(
            args.preset,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            workload=args.workload,
            requests=args.requests,
            a0_requests=args.a0_requests,
            a1_requests=args.a1_requests,
            arms=args.arms,
            max_batch_size=args.max_batch_size,
            naive_batch=args.naive_batch,
            warmup=args.warmup,
            threads=args.threads,
            budget_s=args.budget_s,
            cb_limit_s=args.cb_limit_s,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python -m lmjobs.bench.gpu " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    def say(message: str) -> None:
        print(f"bench {time.time() - started:6.1f}s: {message}", file=sys.stderr, flush=True)

    def write(report: Any) -> None:
        if args.json_out is None:
            return
        data = report.to_json()
        data["meta"]["command"] = command
        data["meta"]["environment"] = env
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    report = run_bench(config, progress=say, checkpoint=write)
    write(report)
    data = report.to_json()
    print(render(data), flush=True)
    print(f"wall {time.time() - started:.1f} s" + (f"; wrote {args.json_out}" if args.json_out else ""))
    return 0 if data["arms"] else 1


if __name__ == "__main__":
    sys.exit(main())
