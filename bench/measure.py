"""Measuring an arm: wall time, peak memory, forward-pass accounting, memory bandwidth.

``StepMeter`` hooks the model's forward: each call is a prefill (more than one new token
per row) or a decode step (one token per row, or a speculative step's token and draft:
``speculation.STATS.in_step`` during its forward); the slot path's decode steps, which call no
forward, it hears from ``slots.STEP_OBSERVERS`` (rows, the batch bucket and the columns
the step ran at). For decode steps it sums the rows, the
time inside the forward (the device synchronized on both sides) and the bytes a step must
read: the weights once plus the KV cache of every row up to the padded length. Bytes over
time over the device's measured bandwidth is the fraction of the decode roofline.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmjobs.bench.models import parameter_bytes
from lmjobs.worker.engine import slots, speculation
from lmjobs.worker.engine.batching import kv_bytes_per_token

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field_name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of the part between ``start`` and ``stop``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's resident
    set high-water mark (VmHWM), reset through ``/proc/self/clear_refs`` where Linux
    allows; elsewhere ``ru_maxrss``, which cannot be reset (a lifetime peak, labelled so).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "rss high-water"
        self.baseline_mb = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.kind = "rss high-water (process lifetime: reset not allowed)"
        self.baseline_mb = (_status_kb("VmRSS") or 0) / 1024

    def stop(self) -> tuple[float, float]:
        """(peak MB, peak MB above what was in use at ``start``)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _status_kb("VmHWM")
            if hwm is None:
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = hwm / 1024
        return round(peak, 1), round(max(0.0, peak - self.baseline_mb), 1)


@dataclass
class StepStats:
    prefill_calls: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0  # rows x padded width: what the forward computed
    prefill_real_tokens: int = 0  # attended (unpadded) prompt tokens
    decode_steps: int = 0
    decode_rows: int = 0
    decode_s: float = 0.0
    decode_bytes: float = 0.0
    drafted_steps: int = 0  # decode steps that checked drafts (several tokens a row)

    def to_json(self, bandwidth: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prefill_calls": self.prefill_calls,
            "prefill_s": round(self.prefill_s, 3),
            "prefill_tokens": self.prefill_tokens,
            "prefill_real_tokens": self.prefill_real_tokens,
            "decode_steps": self.decode_steps,
            "drafted_steps": self.drafted_steps,
            "decode_s": round(self.decode_s, 3),
            "mean_rows_per_decode_step": round(self.decode_rows / self.decode_steps, 2)
            if self.decode_steps
            else None,
            "mean_decode_step_ms": round(1000 * self.decode_s / self.decode_steps, 3)
            if self.decode_steps
            else None,
        }
        achieved = self.decode_bytes / self.decode_s if self.decode_s else None
        out["decode_gb_per_s"] = round(achieved / 1e9, 2) if achieved else None
        out["roofline_fraction"] = round(achieved / bandwidth, 4) if achieved and bandwidth else None
        return out


@dataclass
class StepMeter:
    """Forward hooks on ``model``; use as a context manager around the timed part."""

    model: Any
    device: torch.device
    stats: StepStats = field(default_factory=StepStats)
    # (rows, cache columns) of every decode step: a compiled decode step is one graph per
    # such shape, so a timed shape the warm-up did not meet was compiled on the clock
    decode_shapes: set[tuple[int, int]] = field(default_factory=set)
    _handles: list[Any] = field(default_factory=list)
    _t0: float = 0.0
    _past: int = 0  # cache columns before the current forward
    _kv_bytes: int = 0
    _weight_bytes: int = 0

    def __enter__(self) -> StepMeter:
        self.reset()
        self._kv_bytes = kv_bytes_per_token(self.model)
        self._weight_bytes = parameter_bytes(self.model)
        # Kept out of torch.compile'd calls (the engine's compiled decode step): a hook
        # that dynamo traced would sync and read the clock inside the graph.
        before = torch.compiler.disable(self._before)
        after = torch.compiler.disable(self._after)
        self._handles = [
            self.model.register_forward_pre_hook(before, with_kwargs=True),
            self.model.register_forward_hook(after, with_kwargs=True),
        ]
        slots.STEP_OBSERVERS.append(self._slot_step)
        return self

    def reset(self) -> None:
        """Forget what was counted (after a warm-up), keeping the hooks in place."""
        self.stats = StepStats()
        self.decode_shapes = set()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._slot_step in slots.STEP_OBSERVERS:
            slots.STEP_OBSERVERS.remove(self._slot_step)

    def _slot_step(self, rows: int, width: int, columns: int, seconds: float) -> None:
        """A slot decode step: ``rows`` real rows in a batch bucket of ``width`` slots, each
        reading ``columns`` cache columns (idle slots included: the step reads them)."""
        self.decode_shapes.add((width, columns))
        self.stats.decode_steps += 1
        self.stats.decode_rows += rows
        self.stats.decode_s += seconds
        self.stats.decode_bytes += self._weight_bytes + width * columns * self._kv_bytes

    def _before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # a suffix prefilled after a shared prefix: its mask starts with the cached columns
        self._past = cached_columns(kwargs) if ids_width(kwargs) > 1 else 0
        sync(self.device)
        self._t0 = time.perf_counter()

    def _after(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        sync(self.device)
        elapsed = time.perf_counter() - self._t0
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("decoder_input_ids")
        if ids is None or ids.ndim != 2:
            return
        rows, new = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        drafted = speculation.STATS.in_step  # wider than a column, and a step
        self.stats.drafted_steps += drafted
        if new > 1 and not drafted:
            self.stats.prefill_calls += 1
            self.stats.prefill_s += elapsed
            self.stats.prefill_tokens += rows * new
            # a fresh prefill's mask covers its prompts (and, in a static cache, the
            # empty columns after them), a suffix's starts with its cached prefix: the
            # new columns' sum is the real prompt tokens. (A suffix one token wide counts
            # as a decode step.)
            past = self._past
            real = (
                int(mask[:, past : past + new].sum()) if mask is not None and mask.ndim == 2 else rows * new
            )
            self.stats.prefill_real_tokens += real
            return
        if mask is not None and mask.ndim == 2:
            length = int(mask.shape[1])
        else:
            cache = kwargs.get("past_key_values")
            length = int(cache.get_seq_length()) + 1 if cache is not None else 1
        self.decode_shapes.add((rows, length))
        self.stats.decode_steps += 1
        self.stats.decode_rows += rows
        self.stats.decode_s += elapsed
        self.stats.decode_bytes += self._weight_bytes + rows * length * self._kv_bytes


def ids_width(kwargs: dict[str, Any]) -> int:
    """Columns of a forward's input ids (0 without them)."""
    ids = kwargs.get("input_ids")
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else 0


def cached_columns(kwargs: dict[str, Any]) -> int:
    """Columns a forward's KV cache holds before it runs (0 without a cache, or with one
    that does not say, such as transformers' paged cache)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def memory_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes per second of a large on-device copy (each copy reads and writes the buffer)."""
    n = megabytes * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch, allocator
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    elapsed = time.perf_counter() - start
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * repeats / elapsed


# The matmul the rate is measured on: SmolLM2-135M's MLP up-projection for a batch of 512
# rows (the reference shape); a GPU takes a larger one, or launches dominate.
MATMUL_SHAPE = {"cpu": (512, 576, 1536), "cuda": (8192, 4096, 4096)}


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of ``a @ b`` in ``dtype`` on ``device`` with torch's current threads: the
    best of a few timed rounds of repeated matmuls (the machine's own limit, against which
    each arm's achieved rate is read)."""
    return max(matmul_rates(device, dtype, seconds))


def matmul_rates(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> list[float]:
    """``matmul_rate``'s rounds, each one's FLOP/s (about ``seconds`` / 5 each): how far
    apart they are tells a steady machine from a shared, noisy one."""
    m, k, n = MATMUL_SHAPE.get(device.type, MATMUL_SHAPE["cuda"])
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b  # warm-up
    sync(device)
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        reps = 0
        while reps < 4 or time.perf_counter() - start < seconds / 5:
            a @ b
            reps += 1
        sync(device)
        rates.append(2 * m * k * n * reps / (time.perf_counter() - start))
        if time.perf_counter() >= deadline:
            return rates


# The slowest matmul round may run at this share of the fastest one before a report calls
# the machine unsteady (its arms' ratios then carry the machine's own variation).
STEADY = 0.8


def machine_speed(probes: dict[str, list[float]], steady: float = STEADY) -> dict[str, Any] | None:
    """The matmul rounds of each probe (``matmul_rates``, e.g. before and after the arms),
    in GFLOP/s as [slowest, fastest], the run's extremes, and whether the slowest round kept
    ``steady`` of the fastest's rate. None without rounds."""
    rounds = [r for rates in probes.values() for r in rates]
    if not rounds:
        return None
    low, high = min(rounds), max(rounds)
    spans = {name: [round(min(r) / 1e9, 1), round(max(r) / 1e9, 1)] for name, r in probes.items() if r}
    return {
        "probes_gflop_per_s": spans,
        "low_gflop_per_s": round(low / 1e9, 1),
        "high_gflop_per_s": round(high / 1e9, 1),
        "steady": low >= steady * high,
    }


def matmul_params(model: Any) -> tuple[int, int]:
    """Weights a token multiplies, as (per prompt token, per generated token): every
    ``nn.Linear`` of the model except the output layer, which a prefill applies to its
    last position only (``logits_to_keep``) and each decode step to its one new token."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    head_n = head.weight.numel() if head is not None else 0
    return body, body + head_n


def matmul_flops(model: Any, *, prompt_tokens: int, output_tokens: int) -> float:
    """Matmul FLOPs of prefilling ``prompt_tokens`` and generating ``output_tokens``
    (2 per weight per token; attention's own products left out)."""
    per_prompt, per_output = matmul_params(model)
    return 2.0 * (per_prompt * prompt_tokens + per_output * output_tokens)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
