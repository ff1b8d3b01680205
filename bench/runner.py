"""``lmjobs bench``: how much faster the engine is than the loops people write.

All in-process arms run in one process on the same model and the same requests (see
``arms``); the end-to-end arm runs them as a real job (``e2e``). The report (``report``)
gives output tokens/s, requests/s, speed-ups over A0 and A1, peak memory, warm-up time,
decode-step accounting and the fraction of the decode roofline, and checks greedy outputs
against A0 token for token. What runs, and the presets, are in ``config``.

Arms: A0 naive loop, A1 ``model.generate`` in fixed batches (``naive_batch``), A2 engine static, A3 engine
continuous, A3p A3 with prefix reuse off, A4 engine on an int8 model, A5 engine with
``compile=True`` (the compiled slot step; the static cache elsewhere), A7 the slot step
eagerly, A6 transformers' own continuous batching, A3c the worker's
engine calls in process (one per E2E chunk), E2E the queue. A0 (and A1) may run on the
first N requests only: their rate then stands for the full run, and the report says so.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from lmjobs.bench import arms as bench_arms
from lmjobs.bench import workloads as bench_workloads
from lmjobs.bench.arms import measure
from lmjobs.bench.config import ARMS, BASELINES, RANDOM_PREFIX, BenchConfig
from lmjobs.bench.e2e import E2EOptions, E2EResult, run_e2e
from lmjobs.bench.measure import load_average, matmul_params, matmul_rate, matmul_rates, memory_bandwidth
from lmjobs.bench.models import build_random_model
from lmjobs.bench.report import BenchReport, profile_engine
from lmjobs.worker.engine.core import EngineConfig, resolve_mode
from lmjobs.worker.models import LoadedModel, load_model, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def _model_ref(config: BenchConfig, dtype: torch.dtype) -> str:
    """What ``load_model`` and the worker load: random models are built into a folder."""
    if not config.model.startswith(RANDOM_PREFIX):
        return config.model
    shape = config.model.removeprefix(RANDOM_PREFIX)
    device = "cuda" if config.device.startswith("cuda") else "cpu"
    folder = build_random_model(
        shape,
        cache_dir=config.cache_dir,
        tokenizer=config.tokenizer,
        dtype=dtype,
        device=device,
        seed=config.seed,
    )
    return str(folder)


def _load(
    config: BenchConfig, ref: str, quantize: str | None = None, dtype: str | None = None
) -> LoadedModel:
    return load_model(
        ref, device=config.device, dtype=dtype or config.dtype, cache_dir=config.cache_dir, quantize=quantize
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


Progress = Callable[[str], None]


def run_bench(
    config: BenchConfig,
    progress: Progress | None = None,
    checkpoint: Callable[[BenchReport], None] | None = None,
) -> BenchReport:
    """Run every arm of ``config``; return the report (JSON-ready through ``to_json``).

    ``checkpoint`` is called with the report after every arm (the CLI rewrites its JSON
    file, so a run cut short by a timeout keeps the arms it finished). With
    ``config.budget_s``, an arm that would start after that many seconds is skipped.
    """
    say = progress or (lambda _msg: None)
    saved = checkpoint or (lambda _report: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    base_dtype = resolve_dtype(config.baseline_dtype, device) if config.baseline_dtype else dtype
    load_start = load_average()
    started = time.time()

    say(f"model {config.model} ({device}, {dtype})")
    ref = _model_ref(config, dtype)
    loaded = _load(config, ref)
    baseline = loaded
    if base_dtype != dtype and any(arm in BASELINES for arm in config.arms):
        say(f"baselines {', '.join(BASELINES)}: a second copy of the model in {base_dtype}")
        baseline = _load(config, _model_ref(config, base_dtype), dtype=config.baseline_dtype)
    workload = bench_workloads.build(
        config.workload,
        loaded.tokenizer,
        config.requests,
        seed=config.seed,
        context=loaded.context_length,
    )
    requests = workload.requests
    say(f"workload {workload.name}: {len(requests)} requests")
    report = BenchReport(
        config=config,
        device=device,
        dtype=dtype,
        workload=workload,
        model_ref=ref,
        model_info=loaded.info,
        baseline_dtype=base_dtype,
    )
    say("measuring memory bandwidth")
    report.bandwidth = memory_bandwidth(device, megabytes=1024 if device.type == "cuda" else 256)
    say("measuring the matmul rate")
    report.matmul_probes["start"] = matmul_rates(device, dtype)
    report.matmul_rate = max(report.matmul_probes["start"])
    if baseline is not loaded:  # the baselines run in another dtype: their own rate
        report.baseline_matmul_rate = matmul_rate(device, base_dtype)
    report.matmul_params = matmul_params(loaded.model)

    model, tok = loaded.model, loaded.tokenizer
    in_process = list(config.arms)
    if "E2E" in config.arms and _chunk_size(config) < len(requests):
        # the worker's engine calls without the queue: what E2E loses to Redis and SQL
        # alone (with one chunk they are A3's call, so A3 serves)
        in_process.append("A3c")
    for arm in in_process:
        if arm in ("A4", "E2E"):
            continue  # another process / another model: after the in-process fp arms
        if _over_budget(config, started, arm, report, say):
            continue
        subset = _subset(config, arm, len(requests))
        label = _label(config, arm)
        if arm in BASELINES and baseline is not loaded:
            label += f" ({str(base_dtype).removeprefix('torch.')})"
        say(f"{arm}: {label} ({len(requests[:subset])} requests)")
        fn = _arm_fn(config, arm)
        on = baseline if arm in BASELINES else loaded
        try:
            result = measure(
                arm,
                label,
                fn,
                on.model,
                on.tokenizer,
                requests[:subset],
                device=device,
                subset=subset < len(requests),
                warmup=_warmup(config, arm, requests[:subset]),
                prepare=_prepare(config, arm),
            )
        except Exception as exc:  # one arm failing (a compiler error...) keeps the others
            _failed(report, arm, exc, say)
            _free(device)
            continue
        if arm == "A5" and device.type != "cuda":
            result.notes.append(
                "CPU: the slot step is compiled by inductor on llama-family models (compile time "
                "in the warm-up); other models run the static cache eagerly"
            )
        _note_cold_shapes(config, result)
        report.add(result)
        saved(report)
    if config.profile:
        say("profiling the engine (torch.profiler)")
        report.profile = profile_engine(
            model, tok, requests[: min(16, len(requests))], config.engine(mode="auto")
        )
    if report.arms:  # the machine's speed again: did it change while the arms ran?
        report.matmul_probes["end"] = matmul_rates(device, dtype)
    del model, tok, loaded, baseline  # the models' memory, before the worker loads its own
    _free(device)

    # the queue before int8: its ratio is one of the targets
    missing = e2e_missing_modules()
    if "E2E" in config.arms and missing:
        report.skipped["E2E"] = f"needs {', '.join(missing)}, not importable here (the in-process arms ran)"
        say(f"E2E: skipped ({report.skipped['E2E']})")
    elif "E2E" in config.arms and not _over_budget(config, started, "E2E", report, say):
        _run_e2e(config, ref, workload, device, report, say)
        saved(report)
    if "A4" in config.arms and not _over_budget(config, started, "A4", report, say):
        _run_int8(config, ref, requests, device, report, say)

    report.load_average = {"start": load_start, "end": load_average()}
    report.wall_s = time.time() - started
    return report


def _over_budget(config: BenchConfig, started: float, arm: str, report: BenchReport, say: Progress) -> bool:
    spent = time.time() - started
    if not config.budget_s or spent < config.budget_s:
        return False
    report.skipped[arm] = f"time budget: {spent:.0f} s spent of {config.budget_s:.0f} s"
    say(f"{arm}: skipped ({report.skipped[arm]})")
    return True


# what the E2E arm's worker and its reading of the results need (the in-process arms need
# only torch, transformers and tokenizers)
E2E_MODULES = ("celery", "redis", "sqlalchemy", "alembic", "pydantic", "pydantic_settings")


def e2e_missing_modules() -> list[str]:
    """The modules of ``E2E_MODULES`` that cannot be imported here."""
    missing = []
    for name in E2E_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _label(config: BenchConfig, arm: str) -> str:
    if arm == "A1":
        return f"model.generate, batches of {config.naive_batch}, input order"
    return ARMS[arm]


def _warmup(config: BenchConfig, arm: str, requests: list[Any]) -> list[Any] | None:
    """What ``arm`` warms up on: None (``measure``'s few short requests), or with
    ``warmup="shapes"`` the timed run's first and last batches at full length."""
    if config.warmup != "shapes":
        return None
    batch = {"A0": 1, "A1": config.naive_batch, "A3c": min(_chunk_size(config), config.max_batch_size)}
    return bench_arms.shape_warmup_requests(requests, batch.get(arm, config.max_batch_size))


def _prepare(config: BenchConfig, arm: str) -> bench_arms.PrepareFn | None:
    """The slot arms (A5, A7) size the worker's slot cache for the timed run, and A5
    compiles at every shape of it, in the warm-up."""
    engine = _slot_engine(config, arm)
    return bench_arms.engine_prepare(engine) if engine is not None else None


def _slot_engine(config: BenchConfig, arm: str) -> EngineConfig | None:
    if arm == "A5":
        return config.engine(mode="auto", compile=True)
    if arm == "A7":  # slot decoding, eager: A5's step without torch.compile
        return config.engine(mode="continuous", slots=True)
    return None


def _note_cold_shapes(config: BenchConfig, result: bench_arms.ArmResult) -> None:
    warm = result.extra.get("warmup") or {}
    cold = warm.get("decode_shapes_not_warmed", 0)
    compiled = result.extra.get("compiles_in_timed_window", 0)
    if config.warmup == "shapes" and cold and compiled and result.arm == "A5":  # the compiled arm
        result.notes.append(
            f"{cold} of {warm['decode_shapes_timed']} decode shapes (rows, cache columns) of the "
            f"timed run were not in the warm-up, e.g. {warm['not_warmed_first'][:3]}: a compiled "
            "step recompiled there on the clock"
        )


def _subset(config: BenchConfig, arm: str, n: int) -> int:
    limit = {"A0": config.a0_requests, "A1": config.a1_requests}.get(arm, 0)
    return min(n, limit) if limit > 0 else n


def _arm_fn(config: BenchConfig, arm: str) -> bench_arms.ArmFn:
    if arm == "A0":
        return bench_arms.run_naive
    if arm == "A1":
        return bench_arms.naive_batched(config.naive_batch)
    if arm == "A2":
        return bench_arms.engine_arm(config.engine(mode="static"))
    if arm == "A3":
        return bench_arms.engine_arm(config.engine(mode="continuous"))
    if arm == "A3p":  # A3 without prefix reuse: what sharing prompt prefixes saves
        return bench_arms.engine_arm(config.engine(mode="continuous", prefix_reuse=False))
    slot_engine = _slot_engine(config, arm)
    if slot_engine is not None:  # A5, A7
        return bench_arms.engine_arm(slot_engine)
    if arm == "A6":
        return bench_arms.transformers_cb(config.cb_limit_s)
    if arm == "A3c":
        worker_calls = bench_arms.engine_arm(config.engine(mode="auto"))
        return bench_arms.chunked(worker_calls, _chunk_size(config))
    raise ValueError(f"arm {arm} does not run in process with the main model")


def _run_int8(
    config: BenchConfig,
    ref: str,
    requests: list[Any],
    device: torch.device,
    report: BenchReport,
    say: Progress,
) -> None:
    from lmjobs.jobs.errors import ModelLoadError

    say(f"A4: {ARMS['A4']} ({len(requests)} requests)")
    try:
        quantized = _load(config, ref, quantize="int8")
    except ModelLoadError as exc:
        report.skipped["A4"] = str(exc)
        return
    fn = bench_arms.engine_arm(config.engine(mode="auto"))
    try:
        result = measure(
            "A4",
            ARMS["A4"],
            fn,
            quantized.model,
            quantized.tokenizer,
            requests,
            device=device,
            warmup=_warmup(config, "A4", requests),
        )
    except Exception as exc:
        _failed(report, "A4", exc, say)
    else:
        result.notes.append("int8 weights: outputs may differ from A0 (a different numeric model)")
        report.add(result)
    del quantized
    _free(device)


def _failed(report: BenchReport, arm: str, exc: Exception, say: Progress) -> None:
    logger.exception("arm %s failed", arm)
    first = (str(exc).strip().splitlines() or [""])[0]
    report.skipped[arm] = f"failed: {type(exc).__name__}: {first}"
    say(f"{arm}: {report.skipped[arm]}")


def _chunk_size(config: BenchConfig) -> int:
    return config.chunk_size or 4 * config.max_batch_size


def _run_e2e(
    config: BenchConfig,
    ref: str,
    workload: bench_workloads.Workload,
    device: torch.device,
    report: BenchReport,
    say: Progress,
) -> None:
    chunk = _chunk_size(config)
    say(f"E2E: {ARMS['E2E']} ({len(workload.requests)} requests, chunks of {chunk})")
    opts = E2EOptions(
        model=ref,
        device=config.device,
        dtype=config.dtype,
        chunk_size=chunk,
        model_cache=config.cache_dir,
        database_url=config.e2e_database_url,
        broker_url=config.e2e_broker_url,
        threads=config.threads,
        batch_tokens=config.batch_tokens,
        max_batch_size=config.max_batch_size,
    )
    try:
        result: E2EResult = run_e2e(
            workload.requests,
            bench_arms.warmup_requests(workload.requests),
            task=workload.job_task,
            raw_prompt=workload.raw_prompt,
            opts=opts,
        )
    except Exception as exc:  # no Redis, a worker that does not start: the other arms stand
        report.skipped["E2E"] = f"{type(exc).__name__}: {exc}"[:1000]
        say(f"E2E: skipped ({report.skipped['E2E'][:200]})")
        return
    report.add_e2e(result, engine_arm=_worker_arm(config, device))


def _worker_arm(config: BenchConfig, device: torch.device) -> str:
    """The in-process arm that runs what the worker runs (EngineConfig mode auto)."""
    return "A3" if resolve_mode("auto") == "continuous" else "A2"
