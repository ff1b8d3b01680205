"""The arms table of a report (``BenchReport.to_json``) as plain text: the CLI's rich table,
the Markdown table of docs/benchmarks.md and ``python -m lmjobs.bench.gpu`` share these
cells. Standard library only, so the GPU entry point needs nothing the device image lacks."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    "arm",
    "requests",
    "out tokens",
    "tokens/s",
    "req/s",
    "x A0",
    "x A1",
    "warm-up s",
    "peak MB",
    "rows/step",
    "roofline",
    "matmul rate",
    "same as A0",
)


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def arm_cells(arm: dict[str, Any]) -> list[str]:
    """One row of the arms table."""
    same = arm["correctness_vs_a0"]
    steps = arm["steps"]
    roofline = steps["roofline_fraction"]
    return [
        arm["arm"],
        f"{arm['requests']}" + (" (subset)" if arm["subset"] else ""),
        str(arm["output_tokens"]),
        fmt(arm["output_tokens_per_s"]),
        fmt(arm["requests_per_s"], 2),
        fmt(arm["speedup_vs_a0"], 2),
        fmt(arm["speedup_vs_a1"], 2),
        fmt(arm["warmup_s"], 2),
        fmt(arm["peak_memory_mb"], 0),
        fmt(steps["mean_rows_per_decode_step"]),
        fmt(100 * roofline if roofline is not None else None, 1, "%"),
        fmt(100 * matmul if (matmul := arm.get("matmul_fraction")) is not None else None, 1, "%"),
        "-" if same is None else f"{same['identical']}/{same['compared']}",
    ]


def markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(arm_cells(a)) + " |" for a in report["arms"]]
    return "\n".join(lines)


def speed_warning(meta: dict[str, Any]) -> str | None:
    """A line for a run whose matmul probes (before and after the arms) disagree: the
    machine's speed changed while the arms ran, and the ratios between them carry it."""
    speed = meta.get("machine_speed")
    if not speed or speed["steady"]:
        return None
    return (
        f"the machine's {meta['dtype']} matmul rate ranged {speed['low_gflop_per_s']}-"
        f"{speed['high_gflop_per_s']} GFLOP/s in its probes before and after the arms "
        "(a shared or throttled machine): the ratios between arms carry that variation; "
        "repeat the run, or compare arms measured together"
    )
