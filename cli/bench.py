"""``lmjobs bench``: run the benchmark, render its tables, write its JSON."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from lmjobs.bench.table import COLUMNS, arm_cells, markdown, speed_warning
from lmjobs.bench.table import fmt as _fmt
from lmjobs.cli import context, render
from lmjobs.jobs.errors import ConfigError


def bench(
    *,
    preset: str | None,
    requests: int | None,
    arms: str | None,
    workload: str | None,
    json_out: Path | None,
    device: str | None,
    dtype: str | None,
    model: str | None,
    a0_requests: int | None,
    a1_requests: int | None,
    threads: int | None,
    chunk_size: int | None,
    max_batch_size: int | None,
    e2e_database_url: str | None,
    e2e_broker_url: str | None,
    profile: bool,
    seed: int | None,
    budget_s: float | None = None,
    baseline_dtype: str | None = None,
    as_json: bool,
    markdown_table: bool = False,
) -> None:
    """Parse the options into a BenchConfig, run it, render the report, write its JSON."""
    from lmjobs.bench.config import preset_config
    from lmjobs.bench.runner import run_bench

    if preset == "features":
        _features(model, dtype, requests, threads, json_out, as_json)
        return
    if preset is None and model is None:
        preset = "cpu-smollm2"
    try:
        config = preset_config(
            preset,
            requests=requests,
            arms=arms,
            workload=workload,
            device=device,
            dtype=dtype,
            baseline_dtype=baseline_dtype,
            model=model,
            a0_requests=a0_requests,
            a1_requests=a1_requests,
            threads=threads,
            chunk_size=chunk_size,
            max_batch_size=max_batch_size,
            e2e_database_url=e2e_database_url,
            e2e_broker_url=e2e_broker_url,
            profile=profile or None,
            budget_s=budget_s,
            seed=seed,
            cache_dir=context.settings().model_cache,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None

    def say(message: str) -> None:
        render.err.print(f"[dim]bench:[/] {message}", highlight=False)

    command = "lmjobs " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def write(partial: Any) -> None:
        if json_out is None:
            return
        data = partial if isinstance(partial, dict) else partial.to_json()
        data["meta"]["command"] = command
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    report = run_bench(config, progress=say, checkpoint=write).to_json()
    report["meta"]["command"] = command
    write(report)
    if as_json:
        render.dump_json(report)
        return
    show(report, as_markdown=markdown_table)
    if json_out is not None:
        render.out.print(f"wrote {json_out}")


def show(report: dict[str, Any], *, as_markdown: bool = False) -> None:
    """The report as rich tables: arms, targets, end-to-end, profile."""
    meta, work = report["meta"], report["workload"]
    render.out.print(
        f"[bold]lmjobs bench[/] {meta['date']}  model {meta['model']} "
        f"({meta['device']}, {meta['dtype']}, {meta['threads']} threads)  "
        f"workload {work['name']}: {work['requests']} requests, "
        f"{work['input_tokens']} input tokens, up to {work['max_new_tokens']} new"
    )
    if as_markdown:
        render.out.print(markdown(report), markup=False, highlight=False)
    else:
        table = Table(title="arms", title_justify="left")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col == "arm" else "right", overflow="fold")
        for arm in report["arms"]:
            table.add_row(*arm_cells(arm))
        render.out.print(table)
    for arm in report["arms"]:
        render.out.print(f"  {arm['arm']}: {arm['label']}", highlight=False)
    unsteady = speed_warning(meta)
    if unsteady:
        render.out.print(f"[yellow]{unsteady}[/]", highlight=False)
    subsets = [a["arm"] for a in report["arms"] if a["subset"]]
    if subsets:
        render.out.print(
            f"[yellow]{', '.join(subsets)} ran on the first requests only; their tokens/s is "
            "extrapolated to the full run, and 'same as A0' covers A0's requests.[/]"
        )
    for arm in report["arms"]:
        same = arm["correctness_vs_a0"]
        if same and same["differing_keys"]:
            render.out.print(f"{arm['arm']} differs from A0 on requests {same['differing_keys']}")
        for note in arm["notes"]:
            render.out.print(f"{arm['arm']}: {note}")
    for arm, why in report["skipped"].items():
        render.warn(f"{arm} skipped: {why}")
    if report["e2e"]:
        e = report["e2e"]
        render.out.print(
            f"E2E: {_fmt(e['ratio_to_engine'], 3)} of {e['engine_arm']}'s tokens/s, "
            f"{_fmt(e.get('ratio_to_engine_on_chunks'), 3)} of the same chunks in process (A3c) "
            f"(chunks of {e['chunk_size']}, {e['chunks']} in all, {e['database']}; "
            f"first claim to last result {e['first_claim_to_last_result_s']} s)"
        )
    if report["targets"]:
        t = Table(title="targets (issues 3 and 12)", title_justify="left")
        for col in ("target", "needed", "measured", "met"):
            t.add_column(col)
        for row in report["targets"]:
            t.add_row(
                row["name"],
                _fmt(row["target"], 2),
                _fmt(row["measured"], 2),
                "[green]yes[/]" if row["met"] else "[red]no[/]",
            )
        render.out.print(t)
    if report.get("profile"):
        p = report["profile"]
        t = Table(
            title=f"engine profile: {p['requests']} requests, {p['wall_s']} s wall, "
            f"operators {_fmt(100 * (p['operator_share_of_wall'] or 0), 0)}% of it",
            title_justify="left",
        )
        for col in ("op", "calls", "self s", "% of wall"):
            t.add_column(col)
        for row in p["top"]:
            t.add_row(
                row["op"],
                str(row["calls"]),
                _fmt(row["self_s"], 3),
                _fmt(row["self_pct_of_wall"], 1),
            )
        render.out.print(t)


def _features(
    model: str | None,
    dtype: str | None,
    requests: int | None,
    threads: int | None,
    json_out: Path | None,
    as_json: bool,
) -> None:
    """``--preset features``: output formats and n samples (bench/features.py) on the CPU."""
    from lmjobs.bench.features import run_features, table

    cache_dir = context.settings().model_cache
    assert cache_dir is not None
    report = run_features(
        model=model or "smollm2-135m",
        cache_dir=cache_dir,
        dtype=dtype or "float32",
        requests=requests or 16,
        threads=threads or 0,
    )
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
