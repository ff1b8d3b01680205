"""Commands for the people who use the results: ``report`` and ``schedule add|list|remove``.

``register(app)`` adds them to the ``lmjobs`` app (cli/main.py). Each command parses, calls
one service, renders; services are imported inside the commands to keep start-up fast.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from lmjobs.cli import context, render
from lmjobs.cli.options import job_options
from lmjobs.jobs.errors import LmjobsError, UsageError

JsonOut = typer.Option(False, "--json", help="Machine-readable output")
_SPARK = "▁▂▃▄▅▆▇█"

schedule_app = typer.Typer(help="Recurring jobs from a cron expression.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.add_typer(schedule_app, name="schedule")


# -- report -------------------------------------------------------------------------------


@context.collector_paused()
def report(
    job: int | None = typer.Argument(None, help="Job id [default: the latest job]"),
    html: Path | None = typer.Option(None, "--html", help="Also write an HTML page with plots"),
    force: bool = typer.Option(False, "--force", help="Overwrite --html if it exists"),
    as_json: bool = JsonOut,
) -> None:
    """Totals, per-task figures, latency, throughput, failures and quality of a job."""
    from lmjobs.cli.commands import _latest_job
    from lmjobs.jobs.control import SAMPLE_REQUESTS, get_job
    from lmjobs.jobs.report import build_report

    db = context.database()
    job_id = job if job is not None else _latest_job(db)
    if get_job(db, job_id).requests_total <= SAMPLE_REQUESTS:
        # Scores missing after a crash are written now; a big job's are written as its
        # chunks close and when it finishes (a pass over all of it does not belong here).
        from lmjobs.jobs.metrics import score_job

        try:
            score_job(db, job_id)
        except LmjobsError:
            raise
        except Exception as exc:  # the figures are still worth showing
            render.warn(f"could not score job {job_id}: {type(exc).__name__}: {exc}")
    rep = build_report(db, job_id)
    if html is not None:
        from lmjobs.cli.report_html import render_html
        from lmjobs.jobs.export import open_output

        page = render_html(rep, generated_at=datetime.now(timezone.utc))
        with open_output(html, force=force) as fh:
            fh.write(page)
        render.err.print(f"wrote {html}", highlight=False)
    if as_json:
        render.dump_json(rep.to_json())
    else:
        _report_tables(rep)


def sample_note(sample: Any) -> str:
    """What of a big job's report comes from its sample (jobs/report.py)."""
    return (
        f"{', '.join(f.replace('_', ' ') for f in sample.figures)}: over {sample.requests:,} requests"
        f" of {sample.chunks:,} chunks spread over the job's {sample.chunks_closed:,} closed ones;"
        " counts, tokens and throughput are exact"
    )


def sparkline(values: list[float]) -> str:
    top = max(values, default=0.0)
    if top <= 0:
        return _SPARK[0] * len(values)
    steps = len(_SPARK) - 1
    return "".join(_SPARK[min(steps, int(v / top * steps + 0.5))] for v in values)


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _report_tables(rep: Any) -> None:
    t = rep.totals
    elapsed = rep.elapsed_s
    summary = {
        "status": rep.status,
        "task / model": f"{rep.task} / {rep.model}",
        "requests": f"{t.requests:,} ({t.succeeded:,} ok, {t.failed:,} failed, {t.pending:,} pending)",
        "lines rejected": f"{rep.lines_rejected:,}",
        "tokens in / out": f"{t.input_tokens:,} / {t.output_tokens:,}",
        "elapsed": render.duration(elapsed),
        "tokens/s (out)": _f(t.output_tokens / elapsed) if elapsed else "-",
        "latency p50 / p90 / p99": " / ".join(
            _f(x) for x in (t.latency_ms.p50, t.latency_ms.p90, t.latency_ms.p99)
        )
        + " ms",
    }
    if rep.throughput:
        rates = [b.tokens_per_s for b in rep.throughput]
        summary[f"tokens/s per {render.duration(rep.bucket_s)}"] = (
            f"{sparkline(rates)}  (peak {max(rates):,.1f})"
        )
    for metric, value in {**rep.scores, **rep.corpus_scores}.items():
        summary[metric] = _f(value, 3 if value < 10 else 2)
    if rep.structured is not None:
        st = rep.structured
        summary["valid answers"] = f"{st.valid:,} of {st.answers:,} ({st.valid_share:.1%})"
    if rep.sample is not None:
        summary["sampled"] = sample_note(rep.sample)
    title = f"job {rep.job_id}" + (f" ({rep.name})" if rep.name else "")
    render.kv_table(title, summary)
    render.table(
        [
            "task",
            "requests",
            "ok",
            "failed",
            "pending",
            "tokens in",
            "tokens out",
            "p50 ms",
            "p90 ms",
            "p99 ms",
        ],
        [
            (
                f.task,
                f.requests,
                f.succeeded,
                f.failed,
                f.pending,
                f.input_tokens,
                f.output_tokens,
                _f(f.latency_ms.p50),
                _f(f.latency_ms.p90),
                _f(f.latency_ms.p99),
            )
            for f in [*rep.per_task, t]
        ],
        title="by task",
    )
    if rep.failures:
        render.table(["failures", "reason"], [(n, r) for r, n in rep.failures], title="failures by reason")
    if rep.structured is not None and rep.structured.labels:
        render.table(
            ["answers", "label"], [(n, lbl) for lbl, n in rep.structured.labels], title="choice labels"
        )


# -- schedule -----------------------------------------------------------------------------

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> float:
    """``90m``, ``6h``, ``1h30m``, ``2d`` or plain seconds."""
    text = text.strip().lower()
    if text.replace(".", "", 1).isdigit():
        return float(text)
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        raise UsageError(f"cannot read {text!r} as a duration: use e.g. 90m, 6h or 1h30m")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


@schedule_app.command("add")
@job_options
def schedule_add(
    file: Path = typer.Argument(..., help="JSONL prompts (read anew at each run)"),
    cron: str = typer.Option(..., "--cron", help="Cron expression, e.g. '0 2 * * *'"),
    task: str = typer.Option(..., "--task", "-t", help="translate, summarize, qa, generate, chat"),
    model: str | None = typer.Option(None, "--model", "-m", help="[default: LMJOBS_MODEL]"),
    name: str | None = typer.Option(None, "--name"),
    priority: int = typer.Option(0, "--priority", help="Higher runs first"),
    chunk_size: int | None = typer.Option(None, "--chunk-size"),
    finish_within: str | None = typer.Option(
        None, "--finish-within", help="Deadline after each start (e.g. 5h): then paused"
    ),
    tz: str | None = typer.Option(None, "--tz", help="IANA time zone [default: local]"),
    strict: bool = typer.Option(False, "--strict"),
    as_json: bool = JsonOut,
    *,
    job: dict[str, Any],
) -> None:
    """Create a job from FILE at every cron time (`lmjobs beat` runs it)."""
    from lmjobs.jobs.params import job_params
    from lmjobs.jobs.schedules import add_schedule, list_schedules
    from lmjobs.jobs.submit import make_options

    opts = make_options(
        context.settings(), task=task, model=model, params=job_params(**job), chunk_size=chunk_size
    )
    options: dict[str, Any] = {
        "params": opts.params,
        "chunk_size": opts.chunk_size,
        "priority": priority,
        "strict": strict,
    }
    within = parse_duration(finish_within) if finish_within else None
    db = context.database()
    sid = add_schedule(
        db,
        cron,
        file,
        task,
        options,
        model=opts.model,
        name=name,
        tz=tz,
        finish_within_s=within,
    )
    info = next(i for i in list_schedules(db) if i.id == sid)
    if as_json:
        render.dump_json(info.to_json())
        return
    local = info.next_run_at.astimezone()
    render.out.print(
        f"schedule {sid}: next job at {local:%Y-%m-%d %H:%M %Z} "
        f"({info.next_run_at:%H:%M}Z), then '{info.cron}' in {info.timezone}",
        highlight=False,
    )


@schedule_app.command("list")
def schedule_list(as_json: bool = JsonOut) -> None:
    """Every schedule, with its next run and the last job it created."""
    from lmjobs.jobs.schedules import list_schedules

    items = list_schedules(context.database())
    if as_json:
        render.dump_json([i.to_json() for i in items])
        return
    render.table(
        ["id", "name", "cron", "zone", "task", "model", "file", "next run (UTC)", "last job"],
        [
            (
                i.id,
                i.name,
                i.cron,
                i.timezone,
                i.task,
                i.model,
                i.source_path,
                f"{i.next_run_at:%Y-%m-%d %H:%M}" if i.enabled else "disabled",
                i.last_job_id,
            )
            for i in items
        ],
    )


@schedule_app.command("remove")
def schedule_remove(schedule_id: int = typer.Argument(...), as_json: bool = JsonOut) -> None:
    """Delete a schedule (the jobs it created stay)."""
    from lmjobs.jobs.schedules import remove_schedule

    remove_schedule(context.database(), schedule_id)
    if as_json:
        render.dump_json({"schedule_id": schedule_id, "removed": True})
    else:
        render.out.print(f"schedule {schedule_id} removed")
