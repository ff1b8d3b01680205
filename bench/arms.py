"""The in-process arms of the benchmark, and how one arm is measured.

The baselines (A0, A1, A6) run the model as loaded: an engine arm before them may have left
its Linear weights prepacked for oneDNN (``worker.engine.packing``), and they undo that first
(in their warm-up call, outside the timed window).

- A0: one prompt at a time through ``model.generate``, as a tutorial writes it:
  tokenize, generate (greedy), decode.
- A1: ``model.generate`` on fixed batches (32; the GPU preset 64) in input order, left
  padding, no sorting, with the batch's largest ``max_new_tokens`` (each row is then cut
  to its own limit and its first EOS, and only those tokens count).
- engine arms: ``lmjobs.worker.engine.core.generate`` with an ``EngineConfig`` (A7:
  ``slots=True``, the slot decode step eagerly; A5: ``compile=True``, the same step
  through ``torch.compile`` on llama-family models, the static cache on others).
- A6: transformers' own continuous batching (``ContinuousBatchingManager``: a paged KV
  cache, requests scheduled by transformers), each request with its own
  ``max_new_tokens``: the issue asks which of it and the engine's scheduler is faster.

Every arm answers ``ArmOutput``: per request key, the text (generated ids without the
final EOS, decoded with special tokens skipped, as the engine does), the number of
generated tokens (EOS included, as the engine counts) and the finish reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from lmjobs.bench.measure import PeakMemory, StepMeter, StepStats, sync
from lmjobs.bench.workloads import BenchRequest
from lmjobs.worker.engine import compat, packing
from lmjobs.worker.engine.core import EngineConfig, eos_ids, generate, prepare_slots
from lmjobs.worker.engine.slots import dynamo_compiles

logger = logging.getLogger(__name__)

NAIVE_BATCH = 32
_T = TypeVar("_T")
WARMUP_REQUESTS = 2
WARMUP_NEW_TOKENS = 4


@dataclass
class ArmOutput:
    texts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(self.tokens.values())


@dataclass
class ArmResult:
    arm: str
    label: str
    requests: int
    subset: bool  # ran on the first ``requests`` only; its rate stands for the full run
    output_tokens: int
    elapsed_s: float
    warmup_s: float
    peak_mb: float | None
    peak_delta_mb: float | None
    memory_kind: str
    steps: StepStats
    outputs: ArmOutput
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


ArmFn = Callable[[Any, Any, Sequence[BenchRequest]], ArmOutput]
# run in the warm-up, on the timed requests, before the clock starts (see ``measure``)
PrepareFn = Callable[[Any, Any, Sequence[BenchRequest]], None]


def _record(out: ArmOutput, key: int, ids: list[int], limit: int, eos: Sequence[int], tokenizer: Any) -> None:
    """Cut ``ids`` to ``limit`` and just after the first EOS; store text, count, finish."""
    ids = ids[:limit]
    for i, token in enumerate(ids):
        if token in eos:
            ids = ids[: i + 1]
            break
    stopped = bool(ids) and ids[-1] in eos
    body = ids[:-1] if stopped else ids
    out.texts[key] = str(tokenizer.decode(body, skip_special_tokens=True))
    out.tokens[key] = len(ids)
    out.finish[key] = "stop" if stopped else "length"


def _generate_kwargs(model: Any, tokenizer: Any) -> dict[str, Any]:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return {
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": pad,
        "eos_token_id": sorted(eos_ids(model, tokenizer)),
    }


def _prompt_width(model: Any, enc: Any) -> int:
    """Columns of ``generate``'s output before the new tokens: the prompt for a causal
    model; the decoder start token for an encoder-decoder one."""
    if getattr(model.config, "is_encoder_decoder", False):
        return 1
    return int(enc["input_ids"].shape[1])


def run_naive(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> ArmOutput:
    """A0: the loop a tutorial writes."""
    packing.unpack(model)  # the model as loaded (an engine arm may have packed it)
    out = ArmOutput()
    kwargs = _generate_kwargs(model, tokenizer)
    device = model.device
    for r in requests:
        enc = tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_tensors="pt")
        enc = enc.to(device)
        ids = model.generate(**enc, max_new_tokens=r.max_new_tokens, **kwargs)
        new = ids[0, _prompt_width(model, enc) :].tolist()
        _record(out, r.key, new, r.max_new_tokens, kwargs["eos_token_id"], tokenizer)
    return out


def run_naive_batched(
    model: Any, tokenizer: Any, requests: Sequence[BenchRequest], batch_size: int = NAIVE_BATCH
) -> ArmOutput:
    """A1: fixed batches in input order, left padding, the batch's largest max_new_tokens."""
    packing.unpack(model)  # the model as loaded (an engine arm may have packed it)
    out = ArmOutput()
    kwargs = _generate_kwargs(model, tokenizer)
    device = model.device
    tokenizer.padding_side = "left"
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        # a batch mixing plain and chat-templated texts is tokenized in two calls
        for special in sorted({r.add_special_tokens for r in batch}):
            part = [r for r in batch if r.add_special_tokens == special]
            enc = tokenizer(
                [r.text for r in part],
                add_special_tokens=special,
                padding=True,
                return_tensors="pt",
            ).to(device)
            limit = max(r.max_new_tokens for r in part)
            ids = model.generate(**enc, max_new_tokens=limit, **kwargs)
            width = _prompt_width(model, enc)
            for row, r in zip(ids[:, width:].tolist(), part, strict=True):
                _record(out, r.key, row, r.max_new_tokens, kwargs["eos_token_id"], tokenizer)
    return out


def naive_batched(batch_size: int) -> ArmFn:
    """A1 with batches of ``batch_size``."""

    def run(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> ArmOutput:
        return run_naive_batched(model, tokenizer, requests, batch_size=batch_size)

    return run


def run_transformers_cb(
    model: Any, tokenizer: Any, requests: Sequence[BenchRequest], limit_s: float = 0.0
) -> ArmOutput:
    """A6: every request handed to transformers' continuous batching manager at once. With
    ``limit_s``, a call still waiting for results after that many seconds raises (the arm
    fails and the run goes on to the next arm)."""
    from transformers import GenerationConfig

    packing.unpack(model)  # the model as loaded (an engine arm may have packed it)
    kwargs = _generate_kwargs(model, tokenizer)
    prompts = [tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] for r in requests]
    # a paged cache as large as these requests can fill (left to itself, the manager takes
    # most of the free memory: 6.9 GB for a tiny model on the CPU); the page size is
    # ``block_size`` in transformers 5.17, ``page_size`` later (compat reads either)
    page = compat.continuous_batching_page_size()
    blocks = sum(-(-(len(ids) + r.max_new_tokens) // page) for ids, r in zip(prompts, requests, strict=True))
    cb_config = compat.continuous_batching_config(num_blocks=blocks + 1)
    eos = kwargs["eos_token_id"]
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_new_tokens for r in requests),
        eos_token_id=eos,
        pad_token_id=kwargs["pad_token_id"],
    )
    out = ArmOutput()
    pending = {str(r.key): r for r in requests}
    deadline = time.monotonic() + limit_s if limit_s else None
    with model.continuous_batching_context_manager(
        generation_config=config,
        continuous_batching_config=cb_config,
        block=True,
        timeout=60,
        warmup=False,
    ) as manager:
        for r, ids in zip(requests, prompts, strict=True):
            manager.add_request(input_ids=list(ids), request_id=str(r.key), max_new_tokens=r.max_new_tokens)
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(
                    f"transformers' continuous batching did not finish {len(pending)} of "
                    f"{len(requests)} requests within {limit_s:g} s"
                )
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"transformers' continuous batching stopped with {len(pending)} left")
                continue
            if not result.is_finished() or result.request_id not in pending:
                continue
            r = pending.pop(result.request_id)
            if result.error is not None:
                out.errors[r.key] = str(result.error)
            _record(out, r.key, list(result.generated_tokens), r.max_new_tokens, eos, tokenizer)
    return out


def transformers_cb(limit_s: float = 0.0) -> ArmFn:
    """A6 giving up after ``limit_s`` seconds of one call (0: never)."""

    def run(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> ArmOutput:
        return run_transformers_cb(model, tokenizer, requests, limit_s=limit_s)

    return run


def engine_arm(config: EngineConfig) -> ArmFn:
    def run(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> ArmOutput:
        out = ArmOutput()
        answers = generate(model, tokenizer, [r.request for r in requests], config)
        for r, g in zip(requests, answers, strict=True):
            out.texts[r.key] = g.text
            out.tokens[r.key] = g.output_tokens
            out.finish[r.key] = g.finish_reason.value
            if g.error:
                out.errors[r.key] = g.error
        return out

    return run


def engine_prepare(config: EngineConfig) -> PrepareFn:
    """The slot arms' preparation: the worker's slot cache sized for the timed requests
    and, compiled, the step compiled and run at every shape that cache allows
    (``core.prepare_slots``), so the timed run neither grows the cache nor compiles."""

    def run(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> None:
        prepare_slots(model, tokenizer, [r.request for r in requests], config)

    return run


def chunked(fn: ArmFn, size: int) -> ArmFn:
    """``fn`` called once per ``size`` consecutive requests, as the worker takes a job's
    chunks (the same lines in the same chunks: ingest cuts the file in order)."""

    def run(model: Any, tokenizer: Any, requests: Sequence[BenchRequest]) -> ArmOutput:
        out = ArmOutput()
        for start in range(0, len(requests), size):
            part = fn(model, tokenizer, requests[start : start + size])
            for name in ("texts", "tokens", "finish", "errors"):
                getattr(out, name).update(getattr(part, name))
        return out

    return run


def shape_warmup_requests(requests: Sequence[_T], batch: int) -> list[_T]:
    """The timed run's first ``batch`` requests and its last, partial batch, unchanged
    (their own ``max_new_tokens``): run once, they make every batch size and cache bucket
    of a run in fixed batches (A1, the engine on an even workload) before the clock starts,
    so ``torch.compile`` and CUDA-graph capture happen there. ``measure`` reports any
    decode shape the timed run met that the warm-up did not."""
    n = len(requests)
    head = list(requests[: min(n, batch)])
    rest = n % batch if n > batch else 0
    return head + (list(requests[n - rest :]) if rest else [])


def warmup_requests(requests: Sequence[BenchRequest]) -> list[BenchRequest]:
    """The first few requests, cut to a few new tokens: loads kernels, fills caches."""
    warm = []
    for r in requests[:WARMUP_REQUESTS]:
        params = replace(r.request.params, max_new_tokens=WARMUP_NEW_TOKENS)
        line = {**r.job_line, "id": f"warmup-{r.key}", "max_new_tokens": WARMUP_NEW_TOKENS}
        warm.append(
            replace(
                r,
                request=replace(r.request, params=params),
                max_new_tokens=WARMUP_NEW_TOKENS,
                job_line=line,
            )
        )
    return warm


def measure(
    arm: str,
    label: str,
    fn: ArmFn,
    model: Any,
    tokenizer: Any,
    requests: Sequence[BenchRequest],
    *,
    device: torch.device,
    subset: bool = False,
    warmup: Sequence[BenchRequest] | None = None,
    prepare: PrepareFn | None = None,
) -> ArmResult:
    """Warm up (timed apart; ``warmup``, by default ``warmup_requests``, then ``prepare``
    on ``requests``), then run ``fn`` on ``requests`` under the meters. The graphs
    ``torch.compile`` made in each part are counted (``extra["warmup"]``, written to the
    JSON: ``compiles_in_warmup``, ``compiles_in_timed_window``, which should be 0).

    The meters' forward hooks are already on the model during the warm-up: adding them
    afterwards would change what a ``torch.compile``d call guards on, and the compiled arm
    would recompile inside the timed window.
    """
    warm = warmup_requests(requests) if warmup is None else list(warmup)
    memory = PeakMemory(device)
    compiles = dynamo_compiles()
    with StepMeter(model, device) as meter:
        start = time.perf_counter()
        fn(model, tokenizer, warm)
        if prepare is not None:
            prepare(model, tokenizer, requests)
        sync(device)
        warmup_s = time.perf_counter() - start
        warmed = set(meter.decode_shapes)
        meter.reset()
        memory.start()
        warmup_compiles, compiles = dynamo_compiles() - compiles, dynamo_compiles()
        sync(device)
        start = time.perf_counter()
        output = fn(model, tokenizer, requests)
        sync(device)
        elapsed = time.perf_counter() - start
        timed_compiles = dynamo_compiles() - compiles
    peak, delta = memory.stop()
    result = ArmResult(
        arm=arm,
        label=label,
        requests=len(requests),
        subset=subset,
        output_tokens=output.output_tokens,
        elapsed_s=elapsed,
        warmup_s=warmup_s,
        peak_mb=peak,
        peak_delta_mb=delta,
        memory_kind=memory.kind,
        steps=meter.stats,
        outputs=output,
    )
    cold = sorted(meter.decode_shapes - warmed)
    result.extra["warmup"] = {
        "requests": len(warm),
        "decode_shapes_timed": len(meter.decode_shapes),
        "decode_shapes_not_warmed": len(cold),
        "not_warmed_first": [list(shape) for shape in cold[:10]],  # [rows, cache columns]
        # graphs torch.compile made (any function in this process): the timed window's must be 0
        "compiles_in_warmup": warmup_compiles,
        "compiles_in_timed_window": timed_compiles,
    }
    result.extra["compiles_in_timed_window"] = timed_compiles
    if timed_compiles:
        result.notes.append(f"torch.compile made {timed_compiles} graph(s) inside the timed window")
    if output.errors:
        first = next(iter(output.errors.values()))
        result.notes.append(f"{len(output.errors)} requests failed, e.g. {first}")
    logger.info("%s: %d tokens in %.1f s", arm, output.output_tokens, elapsed)
    return result
