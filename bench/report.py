"""The benchmark's findings: per-arm figures, correctness against A0, the issue's targets.

``BenchReport.to_json`` is the file ``lmjobs bench --json-out`` writes; the CLI renders
the same dictionary as tables. Nothing here prints.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmjobs.bench.arms import ArmOutput, ArmResult
from lmjobs.bench.config import BASELINES
from lmjobs.bench.measure import StepStats, machine_speed
from lmjobs.jobs.engine_api import ModelInfo

if TYPE_CHECKING:
    from lmjobs.bench.config import BenchConfig
    from lmjobs.bench.e2e import E2EResult
    from lmjobs.bench.workloads import BenchRequest, Workload
    from lmjobs.worker.engine.core import EngineConfig

ENGINE_ARMS = ("A2", "A3", "A3p", "A4", "A5", "A7")
FP_ENGINE_ARMS = ("A2", "A3", "A3p", "A5", "A7")  # same weights as A0: must match it exactly in fp32
MAX_LISTED = 20  # differing request keys listed per arm


@dataclass(frozen=True)
class Targets:
    """The issues' targets (issue 3; issue 12 raised the CPU's A1 target) for one setting."""

    vs_a0: float
    vs_a1: float
    roofline: float | None = None


# CPU: smollm2-135m against fp32 baselines, mixed workload (issue 12: 15x A0, 3x A1). GPU:
# 0.5B class, bf16, fixed 128/128.
CPU_TARGETS = Targets(vs_a0=15.0, vs_a1=3.0)
GPU_TARGETS = Targets(vs_a0=100.0, vs_a1=3.0, roofline=0.20)
E2E_TARGET = 0.90


def compare(reference: ArmOutput, other: ArmOutput) -> dict[str, Any]:
    """Same text and same number of generated tokens as A0, on the keys A0 ran."""
    keys = sorted(k for k in reference.texts if k in other.texts)
    differing = [
        k for k in keys if reference.texts[k] != other.texts[k] or reference.tokens[k] != other.tokens[k]
    ]
    same = len(keys) - len(differing)
    return {
        "compared": len(keys),
        "identical": same,
        "identical_pct": round(100.0 * same / len(keys), 2) if keys else None,
        "differing_keys": differing[:MAX_LISTED],
    }


@dataclass
class BenchReport:
    config: BenchConfig
    device: torch.device
    dtype: torch.dtype
    workload: Workload
    model_ref: str
    model_info: ModelInfo
    arms: dict[str, ArmResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    e2e: dict[str, Any] | None = None
    bandwidth: float | None = None
    # FLOP/s of a matmul in the bench's dtype on its device (measure.matmul_rate), and the
    # model's matmul weights per (prompt, generated) token (measure.matmul_params)
    matmul_rate: float | None = None
    matmul_params: tuple[int, int] | None = None
    # The baselines' dtype (A0, A1; BenchConfig.baseline_dtype) and, where it is not the
    # bench's, its matmul rate: their fraction is of the rate of the dtype they ran in.
    baseline_dtype: torch.dtype | None = None
    baseline_matmul_rate: float | None = None
    # each round of the matmul probes (measure.matmul_rates) in the bench's dtype: "start"
    # (before the arms, whose best is ``matmul_rate``) and "end" (after the in-process arms)
    matmul_probes: dict[str, list[float]] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    load_average: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def add(self, result: ArmResult) -> None:
        self.arms[result.arm] = result

    def add_e2e(self, res: E2EResult, *, engine_arm: str) -> None:
        result = ArmResult(
            arm="E2E",
            label="lmjobs submit -> Redis -> lmjobs worker -> SQL",
            requests=res.requests,
            subset=False,
            output_tokens=res.output_tokens,
            elapsed_s=res.elapsed_s,
            warmup_s=res.warmup_s,
            peak_mb=None,
            peak_delta_mb=None,
            memory_kind="worker process (not measured)",
            steps=StepStats(),
            outputs=res.outputs,
        )
        if res.succeeded < res.requests:
            result.notes.append(f"{res.requests - res.succeeded} requests did not succeed")
        self.add(result)

        def share_of(arm: ArmResult | None) -> float | None:
            return result.tokens_per_s / arm.tokens_per_s if arm and arm.tokens_per_s else None

        engine = self.arms.get(engine_arm)
        ratio = share_of(engine)
        # one chunk: the worker's one engine call is the engine arm's call
        per_chunk = share_of(self.arms.get("A3c") or (engine if res.chunks == 1 else None))
        self.e2e = {
            "engine_arm": engine_arm,
            "ratio_to_engine": round(ratio, 3) if ratio is not None else None,
            # the same engine calls in process: what the queue and the database cost alone
            "ratio_to_engine_on_chunks": round(per_chunk, 3) if per_chunk is not None else None,
            "target": E2E_TARGET,
            "met": ratio is not None and ratio >= E2E_TARGET,
            "chunk_size": res.chunk_size,
            "chunks": res.chunks,
            "database": res.database,
            "first_claim_to_last_result_s": round(res.elapsed_s, 3),
            "submit_to_done_s": round(res.submit_to_done_s, 3),
            "between_chunks_s": round(_gaps(res.timeline), 3),
            "chunk_timeline": res.timeline,
        }

    # --- derived figures -----------------------------------------------------------------

    def rate(self, arm: str) -> float | None:
        result = self.arms.get(arm)
        return result.tokens_per_s if result else None

    def correctness(self, arm: str) -> dict[str, Any] | None:
        if arm == "A0" or "A0" not in self.arms or arm not in self.arms:
            return None
        return compare(self.arms["A0"].outputs, self.arms[arm].outputs)

    def best_engine(self, arms: Sequence[str] = FP_ENGINE_ARMS) -> str | None:
        ran = [a for a in arms if a in self.arms and self.arms[a].tokens_per_s > 0]
        return max(ran, key=lambda a: self.arms[a].tokens_per_s) if ran else None

    def targets(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        best = self.best_engine()
        a0, a1 = self.rate("A0"), self.rate("A1")
        cfg = self.config
        is_cpu_target = (
            self.device.type == "cpu"
            and cfg.model == "smollm2-135m"
            and (self.baseline_dtype or self.dtype) == torch.float32  # A0: the seed's fp32 loop
            and cfg.workload == "mixed"
        )
        is_gpu_target = self.device.type == "cuda" and cfg.workload == "fixed"
        spec = CPU_TARGETS if is_cpu_target else GPU_TARGETS if is_gpu_target else None
        if spec is not None and best is not None:
            rate = self.arms[best].tokens_per_s
            for name, needed, ref in (("A0", spec.vs_a0, a0), ("A1", spec.vs_a1, a1)):
                if ref:
                    out.append(_target(f"{best} output tokens/s / {name}'s", needed, rate / ref))
            if spec.roofline is not None:
                frac = self.arms[best].steps.to_json(self.bandwidth)["roofline_fraction"]
                out.append(_target(f"{best} fraction of the decode roofline", spec.roofline, frac))
        if self.e2e is not None:
            out.append(
                _target(
                    f"E2E output tokens/s / {self.e2e['engine_arm']}'s",
                    E2E_TARGET,
                    self.e2e["ratio_to_engine"],
                )
            )
        return out

    def arm_json(self, result: ArmResult) -> dict[str, Any]:
        a0, a1 = self.rate("A0"), self.rate("A1")
        rate = result.tokens_per_s
        return {
            "arm": result.arm,
            "label": result.label,
            "requests": result.requests,
            "subset": result.subset,
            "output_tokens": result.output_tokens,
            "elapsed_s": round(result.elapsed_s, 3),
            "output_tokens_per_s": round(rate, 2),
            "requests_per_s": round(result.requests_per_s, 3),
            "speedup_vs_a0": round(rate / a0, 2) if a0 else None,
            "speedup_vs_a1": round(rate / a1, 2) if a1 else None,
            "warmup_s": round(result.warmup_s, 3),
            "warmup": result.extra.get("warmup"),
            "peak_memory_mb": result.peak_mb,
            "peak_memory_above_start_mb": result.peak_delta_mb,
            "memory_kind": result.memory_kind,
            "correctness_vs_a0": self.correctness(result.arm),
            "matmul_fraction": self.matmul_fraction(result),
            "steps": result.steps.to_json(self.bandwidth),
            "errors": len(result.outputs.errors),
            "finish_reasons": _count(result.outputs.finish.values()),
            "notes": result.notes,
            "extrapolation": self.extrapolation(result) if result.subset else None,
        }

    def matmul_fraction(self, result: ArmResult) -> float | None:
        """The arm's useful matmul FLOPs (2 per weight for each prompt token of its requests
        and each token it wrote; attention, padding and recomputation not counted) per second
        of its wall time, over the measured matmul rate of the dtype it ran in (the baselines'
        own where it differs). None for E2E and A4 (another process; int8 weights)."""
        rate = self.matmul_rate
        if result.arm in BASELINES and self.baseline_matmul_rate:
            rate = self.baseline_matmul_rate
        if not rate or not self.matmul_params or result.arm in ("E2E", "A4") or not result.elapsed_s:
            return None
        per_prompt, per_output = self.matmul_params
        prompts = sum(r.input_tokens for r in self.workload.requests[: result.requests])
        flops = 2.0 * (per_prompt * prompts + per_output * result.output_tokens)
        return round(flops / result.elapsed_s / rate, 4)

    def extrapolation(self, result: ArmResult) -> dict[str, Any]:
        """How a subset arm's rate stands for the full run, with a cross-check.

        The rate of the subset is what the speed-ups use. The cross-check prices the full
        workload with the subset's own costs (seconds per prompt token in prefill, per
        decode step) and the full run's real output tokens (from a full fp engine arm,
        whose greedy outputs are A0's): a subset of atypical requests shows up as a gap.
        """
        out: dict[str, Any] = {
            "method": f"rate of the first {result.requests} of {len(self.workload.requests)} requests",
            "cost_model_tokens_per_s": None,
        }
        steps = result.steps
        full = next(
            (self.arms[a] for a in FP_ENGINE_ARMS if a in self.arms and not self.arms[a].subset), None
        )
        if full is None or not steps.prefill_real_tokens or not steps.decode_steps:
            return out
        per_prompt_token = steps.prefill_s / steps.prefill_real_tokens
        per_step = steps.decode_s / steps.decode_steps / (steps.decode_rows / steps.decode_steps)
        inputs = sum(r.input_tokens for r in self.workload.requests)
        decode_tokens = max(0, full.output_tokens - len(self.workload.requests))
        other = max(0.0, result.elapsed_s - steps.prefill_s - steps.decode_s) / result.requests
        estimate = inputs * per_prompt_token + decode_tokens * per_step + other * len(self.workload.requests)
        out["cost_model_tokens_per_s"] = round(full.output_tokens / estimate, 2)
        return out

    def to_json(self) -> dict[str, Any]:
        import transformers

        cfg = self.config
        return {
            "meta": {
                "date": self.date,
                "preset": cfg.preset,
                "model": cfg.model,
                "model_ref": self.model_ref,
                "model_revision": self.model_info.revision,
                "device": str(self.device),
                "device_name": _device_name(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "baseline_dtype": str(self.baseline_dtype or self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "cpus": _cpu_count(),
                "engine_sha256": engine_fingerprint(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "max_batch_size": cfg.max_batch_size,
                "batch_tokens": cfg.batch_tokens,
                "memory_bandwidth_gb_per_s": round(self.bandwidth / 1e9, 2) if self.bandwidth else None,
                "matmul_gflop_per_s": round(self.matmul_rate / 1e9, 1) if self.matmul_rate else None,
                "baseline_matmul_gflop_per_s": (
                    round(self.baseline_matmul_rate / 1e9, 1) if self.baseline_matmul_rate else None
                ),
                "machine_speed": machine_speed(self.matmul_probes),
                "load_average": self.load_average,
                "wall_s": round(self.wall_s, 1),
            },
            "workload": self.workload.describe(),
            "arms": [self.arm_json(r) for r in self.arms.values()],
            "skipped": self.skipped,
            "e2e": self.e2e,
            "targets": self.targets(),
            "profile": self.profile,
        }


def _target(name: str, target: float, measured: float | None) -> dict[str, Any]:
    return {
        "name": name,
        "target": target,
        "measured": round(measured, 3) if measured is not None else None,
        "met": measured is not None and measured >= target,
    }


def engine_files() -> list[Path]:
    """The engine's source files: ``worker/engine/*.py`` and ``worker/models.py``."""
    import lmjobs.worker.engine as engine_pkg

    root = Path(engine_pkg.__file__).parent
    return [*sorted(root.glob("*.py")), root.parent / "models.py"]


def engine_fingerprint() -> str:
    """A short hash of the engine's source files (:func:`engine_files`, names and bytes):
    which engine a report measured."""
    import hashlib

    digest = hashlib.sha256()
    for path in engine_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _gaps(timeline: list[dict[str, Any]]) -> float:
    """Seconds no chunk of the job was running (after the first claim)."""
    gaps, busy_until = 0.0, None
    for chunk in timeline:
        start, end = chunk["claimed_s"], chunk["closed_s"]
        if start is None or end is None:
            continue
        if busy_until is not None and start > busy_until:
            gaps += start - busy_until
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or platform.machine()


def profile_engine(
    model: Any,
    tokenizer: Any,
    requests: Sequence[BenchRequest],
    config: EngineConfig,
    top: int = 15,
) -> dict[str, Any]:
    """Where the engine's time goes: torch.profiler's top operators by self time, and the
    share of the wall time spent inside operators at all (the rest is Python)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from lmjobs.worker.engine.core import generate

    activities = [ProfilerActivity.CPU]
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    gens = [r.request for r in requests]
    generate(model, tokenizer, gens[:2], config)  # warm-up
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        generate(model, tokenizer, gens, config)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # top-level operators only (aten::linear contains aten::addmm...): self times add up
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return {
        "requests": len(gens),
        "wall_s": round(wall, 3),
        "operator_self_time_s": round(total_self, 3),
        "operator_share_of_wall": round(total_self / wall, 3) if wall else None,
        "sort_key": key,
        "top": [
            {
                "op": e.key,
                "calls": e.count,
                "self_s": round(getattr(e, key, 0.0) / 1e6, 4),
                "self_pct_of_wall": round(100 * getattr(e, key, 0.0) / 1e6 / wall, 2) if wall else None,
            }
            for e in rows
        ],
    }
