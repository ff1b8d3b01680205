"""``lmjobs report --html``: one self-contained page (inline CSS and SVG, no scripts, no
network) with the figures of a job and its plots: throughput over time, a latency
histogram, failures by reason, and a histogram per quality metric.

Every plot is an ``<svg id=...>``; data marks carry ``class="bar"`` or ``class="pt"`` and
a ``<title>`` tooltip, so a test (or a person with a browser) can count and read them.
All text from the database (model names, error messages) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from html import escape

from lmjobs.jobs.report import SCORE_RANGES, Figures, Histogram, JobReport

W, H = 640, 240
L, R, T, B = 56, 16, 16, 36  # margins: left (y labels), right, top, bottom (x labels)
BLUE, TEAL, RED, PURPLE, GRID = "#2563eb", "#0f766e", "#dc2626", "#7c3aed", "#e5e7eb"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#111827;
background:#f9fafb}
main{max-width:1360px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
h3{font-size:13px;margin:4px 0;color:#374151}
.sub{color:#6b7280;margin-bottom:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;
margin-bottom:18px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 12px}
.card b{display:block;font-size:20px}.card span{color:#6b7280;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px;
margin-bottom:14px}
table{border-collapse:collapse;width:100%}
th,td{text-align:right;padding:4px 8px;border-bottom:1px solid #f3f4f6}
th:first-child,td:first-child{text-align:left}
th{color:#6b7280;font-weight:600}
svg{width:100%;height:auto;font-size:11px}svg text{fill:#4b5563}
.empty{color:#9ca3af;font-style:italic}
.status-completed{color:#15803d}.status-failed,.status-completed_with_failures{color:#b91c1c}
"""


def _fmt(v: float | int | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def _nice_max(v: float, *, integer: bool = False) -> float:
    """An axis top at or above ``v`` whose four grid steps are round numbers."""
    if v <= 0:
        return 4.0 if integer else 1.0
    quarter = v / 4
    mag = 10 ** int(f"{quarter:e}".split("e")[1])
    step = next(m * mag for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8, 10) if m * mag >= quarter)
    if integer:
        step = max(1, math.ceil(step))
    return 4 * step


def _frame(
    svg_id: str, title: str, ymax: float, x_labels: Sequence[tuple[float, str]], y_label: str
) -> list[str]:
    """The svg element, grid lines and axis labels; x positions in 0..1 of the plot width."""
    pw, ph = W - L - R, H - T - B
    out = [
        f'<svg id="{svg_id}" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):
        y = T + ph - ph * i / 4
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        tick = format(round(ymax * i / 4, 6), ",g")
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    for frac, label in x_labels:
        x = L + pw * frac
        anchor = "start" if frac == 0 else ("end" if frac == 1 else "middle")
        out.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="{anchor}">{escape(label)}</text>')
    out.append(
        f'<text x="12" y="{T + ph / 2:.1f}" transform="rotate(-90 12 {T + ph / 2:.1f})" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    return out


def throughput_svg(rep: JobReport) -> str:
    pts = rep.throughput
    if not pts:
        return '<p class="empty">No results yet.</p>'
    ymax = _nice_max(max(b.tokens_per_s for b in pts))
    span = rep.bucket_s * max(1, len(pts) - 1)
    pw, ph = W - L - R, H - T - B
    labels = [(f, "+" + _duration(span * f)) for f in (0.0, 0.5, 1.0)]
    out = _frame("throughput", "Output tokens per second over time", ymax, labels, "tokens/s")
    xy = []
    for i, b in enumerate(pts):
        x = L + (pw * i / (len(pts) - 1) if len(pts) > 1 else pw / 2)
        y = T + ph - ph * b.tokens_per_s / ymax
        xy.append((x, y, b))
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy)
    base = T + ph
    area = f"{xy[0][0]:.1f},{base} {coords} {xy[-1][0]:.1f},{base}"
    out.append(f'<polygon class="area" points="{area}" fill="{BLUE}" fill-opacity="0.12"/>')
    out.append(
        f'<polyline class="series" points="{coords}" fill="none" stroke="{BLUE}" '
        f'stroke-width="2" stroke-linejoin="round"/>'
    )
    for x, y, b in xy:
        tip = f"{b.start:%H:%M:%S}Z: {b.tokens_per_s:,.1f} tokens/s, {b.requests} requests"
        out.append(
            f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{BLUE}">'
            f"<title>{escape(tip)}</title></circle>"
        )
    return "\n".join([*out, "</svg>"])


def histogram_svg(svg_id: str, title: str, h: Histogram, color: str, unit: str, x_label: str) -> str:
    if not any(h.counts):
        return f'<p class="empty">No data for {escape(title.lower())}.</p>'
    ymax = _nice_max(max(h.counts), integer=True)
    digits = 0 if h.hi >= 10 else 2
    labels = [(f, _fmt(h.lo + (h.hi - h.lo) * f, digits)) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    out = _frame(svg_id, title, ymax, labels, "count")
    pw, ph = W - L - R, H - T - B
    bw = pw / len(h.counts)
    for i, n in enumerate(h.counts):
        bh = ph * n / ymax
        lo, hi = h.lo + i * h.width, h.lo + (i + 1) * h.width
        tip = f"{_fmt(lo, digits)}-{_fmt(hi, digits)} {unit}: {n}"
        out.append(
            f'<rect class="bar" x="{L + i * bw + 1:.1f}" y="{T + ph - bh:.1f}" '
            f'width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" fill="{color}">'
            f"<title>{escape(tip)}</title></rect>"
        )
    out.append(f'<text x="{L + pw / 2:.1f}" y="{H - 4}" text-anchor="middle">{escape(x_label)}</text>')
    return "\n".join([*out, "</svg>"])


def failures_svg(failures: Sequence[tuple[str, int]]) -> str:
    if not failures:
        return '<p class="empty">No failures.</p>'
    row, label_w = 26, 260
    height = T + row * len(failures) + 8
    top = max(n for _, n in failures)
    out = [
        f'<svg id="failures" viewBox="0 0 {W} {height}" role="img" aria-label="Failures by '
        f'reason" xmlns="http://www.w3.org/2000/svg"><title>Failures by reason</title>'
    ]
    for i, (reason, n) in enumerate(failures):
        y = T + i * row
        bw = (W - label_w - R - 48) * n / top
        short = reason if len(reason) <= 42 else reason[:41] + "…"
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(short)}</text>')
        out.append(
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{max(bw, 1):.1f}" '
            f'height="{row - 8}" fill="{RED}"><title>{escape(reason)}: {n}</title></rect>'
        )
        out.append(f'<text x="{label_w + bw + 6:.1f}" y="{y + 15}">{n:,}</text>')
    return "\n".join([*out, "</svg>"])


def _cards(rep: JobReport) -> str:
    t = rep.totals
    elapsed = rep.elapsed_s
    rate = t.output_tokens / elapsed if elapsed else None
    items = [
        ("requests", _fmt(t.requests)),
        ("succeeded", _fmt(t.succeeded)),
        ("failed", _fmt(t.failed)),
        ("pending", _fmt(t.pending)),
        ("lines rejected", _fmt(rep.lines_rejected)),
        ("tokens in", _fmt(t.input_tokens)),
        ("tokens out", _fmt(t.output_tokens)),
        ("elapsed", _duration(elapsed)),
        ("tokens/s (out, overall)", _fmt(rate)),
        ("latency p50 ms", _fmt(t.latency_ms.p50)),
        ("latency p90 ms", _fmt(t.latency_ms.p90)),
        ("latency p99 ms", _fmt(t.latency_ms.p99)),
    ]
    items += [(f"{m} (mean)", _fmt(v, 3 if v < 10 else 1)) for m, v in rep.scores.items()]
    items += [(m.replace("_", " "), _fmt(v, 1)) for m, v in rep.corpus_scores.items()]
    if rep.structured is not None:
        items.append(("valid answers", f"{rep.structured.valid_share:.1%}"))
    return "".join(f'<div class="card"><b>{v}</b><span>{escape(k)}</span></div>' for k, v in items)


def _task_table(figs: Sequence[Figures]) -> str:
    head = (
        "task",
        "requests",
        "succeeded",
        "failed",
        "pending",
        "tokens in",
        "tokens out",
        "p50 ms",
        "p90 ms",
        "p99 ms",
    )
    rows = [
        (
            f.task,
            _fmt(f.requests),
            _fmt(f.succeeded),
            _fmt(f.failed),
            _fmt(f.pending),
            _fmt(f.input_tokens),
            _fmt(f.output_tokens),
            _fmt(f.latency_ms.p50),
            _fmt(f.latency_ms.p90),
            _fmt(f.latency_ms.p99),
        )
        for f in figs
    ]
    th = "".join(f"<th>{h}</th>" for h in head)
    cells = ("".join(f"<td>{escape(str(c))}</td>" for c in r) for r in rows)
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _labels_table(rep: JobReport) -> str:
    """Structured answers: the valid share, and each choice label's count."""
    st = rep.structured
    if st is None:
        return ""
    rows = "".join(f"<tr><td>{escape(lbl)}</td><td>{n:,}</td></tr>" for lbl, n in st.labels)
    table = f"<table><thead><tr><th>label</th><th>answers</th></tr></thead><tbody>{rows}</tbody></table>"
    return (
        f'<section id="structured"><h2>Structured answers</h2><div class="sub">{st.valid:,} of '
        f"{st.answers:,} valid ({st.valid_share:.1%})</div>{table if st.labels else ''}</section>"
    )


def _sample_note(rep: JobReport) -> str:
    """A big job's sampled figures (jobs/report.py), said above them."""
    if rep.sample is None:
        return ""
    sp = rep.sample
    figures = ", ".join(f.replace("_", " ") for f in sp.figures)
    return (
        f'<p class="sub" id="sample">Sampled: {escape(figures)}, over {sp.requests:,} requests of'
        f" {sp.chunks:,} chunks spread over the job's {sp.chunks_closed:,} closed ones. Counts, tokens"
        " and throughput are exact.</p>"
    )


def render_html(rep: JobReport, *, generated_at: datetime) -> str:
    title = f"lmjobs job {rep.job_id}" + (f" ({rep.name})" if rep.name else "")
    lat = rep.latency_histogram
    lat_note = f" ({lat.above:,} slower than p99 not drawn)" if lat.above else ""
    scores = (
        "".join(
            f"<div><h3>{escape(m)}: mean {_fmt(rep.scores.get(m), 1 if m in SCORE_RANGES else 3)}</h3>"
            f"{histogram_svg(f'score-{m}', f'{m} per request', h, PURPLE, m, m)}</div>"
            for m, h in rep.score_histograms.items()
        )
        or '<p class="empty">No scores (no request carries a reference).</p>'
    )
    sections = [
        f"<section><h2>Throughput</h2>{throughput_svg(rep)}"
        f'<div class="sub">buckets of {_duration(rep.bucket_s)} by result time</div></section>',
        f"<section><h2>Latency{escape(lat_note)}</h2>"
        f"{histogram_svg('latency', 'Latency of succeeded requests', lat, TEAL, 'ms', 'ms')}"
        "</section>",
        f"<section><h2>Failures by reason</h2>{failures_svg(rep.failures)}</section>",
        f'<section><h2>Quality</h2><div class="grid">{scores}</div></section>',
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<div class="sub">{escape(rep.task)} · {escape(rep.model)} ·
<span class="status-{escape(rep.status)}">{escape(rep.status)}</span> ·
created {rep.created_at:%Y-%m-%d %H:%M}Z · report {generated_at:%Y-%m-%d %H:%M}Z</div>
<div class="cards">{_cards(rep)}</div>
{_sample_note(rep)}
<section><h2>By task</h2>{_task_table([*rep.per_task, rep.totals])}</section>
{_labels_table(rep)}
<div class="grid">{"".join(sections)}</div>
</main></body></html>
"""
