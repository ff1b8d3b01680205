"""The baselines' dtype: A0 and A1 (the loops people write) run on a second copy of the model
in ``baseline_dtype`` (the CPU preset: fp32, the seed's loop) while the engine arms run at the
bench's dtype, and each arm's matmul fraction is of the rate of the dtype it ran in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from services import cli_env, run_cli

from lmjobs.bench import arms as bench_arms
from lmjobs.bench.config import preset_config
from lmjobs.bench.runner import run_bench


def test_the_baselines_run_on_their_own_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def recording(arm: str, fn: Any) -> Any:
        def run(model: Any, tok: Any, requests: Any) -> Any:
            seen.setdefault(arm, next(model.parameters()).dtype)
            return fn(model, tok, requests)

        return run

    monkeypatch.setattr(bench_arms, "run_naive", recording("A0", bench_arms.run_naive))
    batched = bench_arms.naive_batched
    monkeypatch.setattr(bench_arms, "naive_batched", lambda n: recording("A1", batched(n)))
    engine = bench_arms.engine_arm
    monkeypatch.setattr(bench_arms, "engine_arm", lambda cfg: recording("engine", engine(cfg)))
    config = preset_config(
        "cpu-tiny",
        dtype="bfloat16",
        baseline_dtype="float32",
        arms="A0,A1,A3",
        requests=4,
        a0_requests=2,
        threads=1,
        cache_dir=tmp_path / "models",
    )
    report = run_bench(config)
    assert seen == {"A0": torch.float32, "A1": torch.float32, "engine": torch.bfloat16}
    meta = report.to_json()["meta"]
    assert (meta["dtype"], meta["baseline_dtype"]) == ("bfloat16", "float32")
    assert meta["baseline_matmul_gflop_per_s"] > 0 and meta["matmul_gflop_per_s"] > 0
    labels = {a["arm"]: a["label"] for a in report.to_json()["arms"]}
    assert labels["A0"].endswith("(float32)") and labels["A1"].endswith("(float32)")
    assert "float32" not in labels["A3"]
    # A0's and A1's fractions are of the baselines' (fp32) rate, the engine's of bf16's
    before = {arm: report.matmul_fraction(report.arms[arm]) for arm in ("A0", "A1", "A3")}
    assert report.baseline_matmul_rate is not None
    report.baseline_matmul_rate *= 2
    after = {arm: report.matmul_fraction(report.arms[arm]) for arm in ("A0", "A1", "A3")}
    assert after["A3"] == before["A3"]
    for arm in ("A0", "A1"):
        assert after[arm] == pytest.approx(before[arm] / 2, abs=2e-4), arm


def test_one_dtype_loads_one_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmjobs.bench import runner

    loads: list[str | None] = []
    real = runner._load
    monkeypatch.setattr(runner, "_load", lambda *a, **k: loads.append(k.get("dtype")) or real(*a, **k))
    config = preset_config(
        "cpu-tiny", baseline_dtype="float32", arms="A0,A3", requests=2, a0_requests=1, threads=1,
        cache_dir=tmp_path / "models",
    )  # fmt: skip
    report = run_bench(config)
    assert loads == [None] and report.baseline_matmul_rate is None
    assert report.to_json()["meta"]["baseline_dtype"] == "float32"


def test_presets_and_bad_dtypes() -> None:
    cpu = preset_config("cpu-smollm2")
    assert (cpu.dtype, cpu.baseline_dtype) == ("auto", "float32")
    assert preset_config("gpu").baseline_dtype == ""  # the GPU targets compare bf16 with bf16
    with pytest.raises(ValueError, match="--baseline-dtype: unknown dtype 'fp8'"):
        preset_config("cpu-tiny", baseline_dtype="fp8")
    with pytest.raises(ValueError, match="--dtype: unknown dtype 'int4'"):
        preset_config("cpu-tiny", dtype="int4")


def test_the_cli_refuses_a_bad_baseline_dtype(tmp_path: Path) -> None:
    env = cli_env(LMJOBS_MODEL_CACHE=str(tmp_path / "models"))
    proc = run_cli(["bench", "--preset", "cpu-tiny", "--baseline-dtype", "fp8"], env, timeout=120)
    assert proc.returncode != 0
    assert "--baseline-dtype: unknown dtype 'fp8'" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_the_engine_fingerprint_covers_the_engine_sources() -> None:
    from lmjobs.bench.report import engine_files, engine_fingerprint

    names = {(p.parent.name, p.name) for p in engine_files()}
    want = {("engine", "core.py"), ("engine", "packing.py"), ("engine", "slots.py"), ("worker", "models.py")}
    assert want <= names
    assert all(p.is_file() for p in engine_files())
    assert len(engine_fingerprint()) == 12
