"""What ``lmjobs bench`` runs: the arms, their aliases, ``BenchConfig`` and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmjobs.bench import workloads as bench_workloads
from lmjobs.bench.e2e import DEFAULT_BROKER
from lmjobs.bench.models import SHAPES
from lmjobs.worker.engine.core import EngineConfig
from lmjobs.worker.models import DTYPE_NAMES, known_dtype

ARMS: dict[str, str] = {
    "A0": "naive: model.generate, one prompt at a time",
    "A1": "model.generate, fixed batches in input order",
    "A2": "engine, mode=static",
    "A3": "engine, mode=continuous",
    "A4": "engine, int8 weights (mode=auto)",
    "A5": "engine, compile=True (mode=auto; the compiled slot step on llama-family models)",
    "A6": "transformers continuous batching (paged cache)",
    "A3c": "engine (worker's mode), one call per E2E chunk, in process",
    "A3p": "engine, mode=continuous, prefix reuse off",
    "A7": "engine, mode=continuous, slot decoding (eager)",
    "E2E": "lmjobs submit -> Redis -> lmjobs worker -> SQL",
}
ALIASES = {
    "static": "A2",
    "continuous": "A3",
    "int8": "A4",
    "compile": "A5",
    "hf-cb": "A6",
    "e2e": "E2E",
    "no-prefix": "A3p",
    "slots": "A7",
}
BASELINES = ("A0", "A1")  # the loops people write: at ``BenchConfig.baseline_dtype`` when set
RANDOM_PREFIX = "random:"
WARMUPS = ("short", "shapes")


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"  # alias, HF id, folder, or "random:<shape>" (bench.models)
    tokenizer: str = "trained"  # random models: "trained" or "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    # The dtype of the baselines (A0, A1: the loops people write), on a second copy of the
    # model when it differs from ``dtype``; "" = ``dtype``. The CPU preset's engine arms run
    # at the default ``auto`` (bf16 where the CPU computes it) against the seed's fp32 loop,
    # so its "same as A0" column is the engine's greedy agreement with fp32.
    baseline_dtype: str = ""
    workload: str = "mixed"
    requests: int = 128
    a0_requests: int = 16  # 0: all
    a1_requests: int = 0  # 0: all
    arms: tuple[str, ...] = ("A0", "A1", "A2", "A3", "A4", "E2E")
    threads: int | None = None
    seed: int = 0
    max_batch_size: int = 64
    batch_tokens: int = 0
    naive_batch: int = 32  # A1's batch size
    # "short": each arm warms up on 2 requests of 4 new tokens (CPU: cheap); "shapes": on
    # the timed run's first batch and its last, partial one, with their own max_new_tokens,
    # so every batch size and cache bucket the timed run uses is compiled (and its CUDA
    # graphs captured) before the clock starts
    warmup: str = "short"
    chunk_size: int = 0  # E2E; 0: 4 x max_batch_size
    e2e_database_url: str = ""
    e2e_broker_url: str = DEFAULT_BROKER
    profile: bool = False
    budget_s: float = 0.0  # skip arms that would start after this many seconds (0: none)
    # A6 gives up (the arm fails, the run goes on) after this many seconds of one call (0:
    # never): under transformers 5.17 its manager was seen not to finish at all
    cb_limit_s: float = 0.0
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".lmjobs" / "models")
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.workload not in bench_workloads.WORKLOADS:
            raise ValueError(
                f"unknown workload {self.workload!r} (use {', '.join(bench_workloads.WORKLOADS)})"
            )
        if self.warmup not in WARMUPS:
            raise ValueError(f"unknown warm-up {self.warmup!r} (use {', '.join(WARMUPS)})")
        for flag, name in (("--dtype", self.dtype), ("--baseline-dtype", self.baseline_dtype)):
            if name and not known_dtype(name):
                raise ValueError(f"{flag}: unknown dtype {name!r} (use {', '.join(DTYPE_NAMES)})")
        if self.naive_batch < 1:
            raise ValueError("A1's batch size must be at least 1")
        if self.requests < 1 or self.a0_requests < 0 or self.a1_requests < 0:
            raise ValueError("--requests must be at least 1 and subsets at least 0")
        shape = self.model.removeprefix(RANDOM_PREFIX)
        if self.model.startswith(RANDOM_PREFIX) and shape not in SHAPES:
            raise ValueError(f"unknown model shape {shape!r} (use {', '.join(SHAPES)})")

    def engine(self, **changes: Any) -> EngineConfig:
        base = EngineConfig(batch_tokens=self.batch_tokens, max_batch_size=self.max_batch_size)
        return replace(base, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M on the CPU: the CPU target (mixed workload), the engine at the
    # default dtype (bf16 where the CPU computes it natively, else fp32) against fp32 loops.
    # Sized to finish in under ten minutes on 2 shared cores, where prompt processing dominates.
    "cpu-smollm2": {
        "model": "smollm2-135m",
        "device": "cpu",
        "dtype": "auto",
        "baseline_dtype": "float32",
        "workload": "mixed",
        "requests": 32,
        "a0_requests": 6,
        "a1_requests": 0,
        "max_batch_size": 64,
        # one chunk: the worker makes the same engine call as A3, so E2E / A3 is what the
        # queue and the database cost (chunks smaller than the engine's batch also cost
        # batching: A3c measures that when chunks are smaller than the job)
        "chunk_size": 32,
        "arms": ("A0", "A1", "A2", "A3", "A6", "A4", "E2E"),
    },
    # A tiny random llama: every arm in seconds (smoke runs, CI).
    "cpu-tiny": {
        "model": "random:tiny-llama",
        "tokenizer": "trained",
        "device": "cpu",
        "dtype": "float32",
        "workload": "mixed",
        "requests": 64,
        "a0_requests": 16,
        "max_batch_size": 32,
        "chunk_size": 32,
        "arms": ("A0", "A1", "A2", "A3", "A6", "A4", "E2E"),
    },
    # One GPU, a Qwen2.5-0.5B-shaped random model in bf16, 128 in / 128 out.
    "gpu": {
        "model": "random:qwen2.5-0.5b",
        "tokenizer": "trained",
        "device": "cuda",
        "dtype": "bfloat16",
        "workload": "fixed",
        "requests": 2048,
        "a0_requests": 16,
        "a1_requests": 256,
        "naive_batch": 64,
        "warmup": "shapes",
        "max_batch_size": 256,
        "chunk_size": 512,
        "budget_s": 390.0,
        "cb_limit_s": 90.0,
        "arms": ("A0", "A1", "A2", "A3", "A5", "A6", "E2E", "A4"),
    },
}


def preset_config(name: str | None, **overrides: Any) -> BenchConfig:
    """A preset's config with the caller's overrides (``None`` values are ignored)."""
    fields: dict[str, Any] = {}
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (use one of {', '.join(PRESETS)})")
        fields.update(PRESETS[name])
        fields["preset"] = name
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if "arms" in fields:
        fields["arms"] = parse_arms(fields["arms"])
    return BenchConfig(**fields)


def parse_arms(arms: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = arms.split(",") if isinstance(arms, str) else list(arms)
    out: list[str] = []
    for item in items:
        name = item.strip()
        if not name:
            continue
        arm = ALIASES.get(name.lower()) or next((a for a in ARMS if a.lower() == name.lower()), name)
        if arm not in ARMS:
            raise ValueError(f"unknown arm {name!r} (use {', '.join(ARMS)})")
        if arm not in out:
            out.append(arm)
    return tuple(out)
