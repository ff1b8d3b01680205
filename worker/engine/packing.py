"""Prepacked Linear weights on the CPU (oneDNN), for the engine's decode: bf16 where the CPU
computes it natively, fp32 on AMD CPUs and on AVX2 CPUs without AVX-512.

A small model's decode step on the CPU is bound by per-operator overhead, and a bf16
``F.linear`` reorders its weight into oneDNN's blocked layout on every call. Reordering
each weight once (``torch.ops.mkldnn._reorder_linear_weight``) and calling
``torch.ops.mkldnn._linear_pointwise`` with it ran 2-2.5x faster at decode batch sizes on a
Zen 4 with AVX512-BF16 (SmolLM2: 576->1536 at 6 rows 122 -> 56 us; the 576->49152 output
layer 6.6 -> 2.6 ms), with the same result (bitwise on the shapes measured). A weight
packed with no batch-size hint serves every row count (1 to a prefill's hundreds) as fast
as one packed for that count, so one packing serves prefill and every decode step.

fp32 on an AVX2 CPU (a Zen 3, torch 2.13): ``F.linear`` goes to MKL's sgemm, which is slow
at a decode step's few rows: SmolLM2's output layer took 8.7 / 29.3 / 24.1 / 48.3 ms at
1 / 3 / 10 / 64 rows, the packed oneDNN weight 4.2 / 4.4 / 7.4 / 26.8 ms; its MLP layers
1.4-3x faster at 3 to 20 rows, the same from 64 rows up to a prefill's 512 (the one layer
slower, 576->192 at one row, is 13 against 37 us). On a Zen 5 with AVX-512 (two threads)
the same: the output layer 7.1 / 23.4 / 15.1 / 31.6 ms at 1 / 3 / 10 / 64 rows against
2.3 / 2.5 / 2.7 / 8.9 packed, 576->1536 136-690 us against 37-240 at 3 to 64 rows. The
answers differ from sgemm's in the last bits (summation order: 1e-6 relative), not bitwise,
so greedy decoding agrees with the plain path except at near ties (``docs/benchmarks.md``
counts it). On an Intel CPU with AVX-512 (a Sapphire Rapids-class Xeon, two threads) MKL's
sgemm is Intel's own and neither wins throughout: 576->1536 took 81 / 94 / 220 / 655 us at 1 /
3 / 10 / 64 rows against 114 / 121 / 167 / 546 packed, the output layer 4.2 / 4.7 / 17.0 /
20.4 ms against 3.7 / 5.0 / 5.5 / 16.8; a whole fp32 ``lmjobs run`` (``bench.runloop``) ran at
211 tokens/s packed against 227 plain, so fp32 stays on the plain path there.

Where (``wanted``): the CPU, and either bf16 weights on a CPU that computes bf16 natively
(``cpu_computes_bf16``: without AVX512-BF16/AMX bf16 is emulated and fp32 is the dtype
anyway) or fp32 weights on an AMD CPU with AVX2, or any with AVX2 and no AVX-512
(``fp32_packing_pays``; an Intel CPU with AVX-512 keeps sgemm); and this torch has the
private oneDNN ops and they pass a small self-check in that dtype (``available``; they are
private API, so a torch without them, or where they fail, runs the plain path). Never with
``compile`` (inductor takes the modules' own weights).

Siblings (``_siblings``): on Llama, Qwen2 and Mistral, whose modeling code calls a layer's
q/k/v projections on one tensor and its MLP's gate and up projections on another, each
group is packed as one weight (the rows stacked, the biases too) and the first call computes
every sibling's output at once; the others take their slice of it (``_Group``). A decode step
then makes 4 oneDNN calls a layer instead of 7, and the larger weights stream faster: on a
Sapphire Rapids-class Xeon (AMX, two threads) SmolLM2's 30 layers' projections, read from
memory at one row, took 16.2 ms as 7 calls a layer and 13.0 as 4; its slot step at one row
32.0 -> 30.0 ms. The logits were bitwise those of the per-module packing (SmolLM2, prefill and
decode).

How (``pack``/``unpack``): in place, once per model and kept for the worker's life, like the
slot cache. Each packable ``nn.Linear`` (bf16, on the CPU, 2-D weight) gets the packed
weight and an instance ``forward`` that calls the oneDNN op; its plain weight is released
(the Parameter keeps its shape, dtype and device over one zero-stride element: the packed
tensor is the only copy of the weights, and the freed memory is handed back to the system),
so the memory does not grow. A weight shared with
another module (an output layer tied to the embeddings) is kept and packed beside it: that
one layer is held twice (SmolLM2: 57 MB beside 270). ``unpack`` restores every weight and
forward (the packed tensors back to dense: exact). The reorders run on one thread: on 2
cores of a Zen 4 packing SmolLM2 took 1.0-2.5 s with torch's two threads and 0.25-0.55 s with
one (the same process, interleaved, the machine shared; a reorder is a few hundred
microseconds of copying, and two threads only add their fork and join). Unpacking ~0.5-1 s:
once per worker, not per call.

The engine packs at its first call that wants it and unpacks when a call does not (its
``EngineConfig.pack_weights`` off, or ``compile``). Code that runs the model outside the
engine (the benchmark's ``model.generate`` baselines) calls ``unpack`` first; a packed
model computes the same outputs, only its Linear weights are not readable as tensors.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_ATTR = "_lmjobs_packed"  # the packed weight, on a packed Linear module


PACKED_DTYPES = (torch.bfloat16, torch.float32)
# Sibling projections packed as one weight (``_siblings``), on the model types whose
# modeling code calls them on one input tensor: Llama, Qwen2 and Mistral's attention
# (``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)``) and MLP (``gate_proj(x)``, ``up_proj(x)``).
FUSED_MODEL_TYPES = ("llama", "qwen2", "mistral")
FUSED_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX-BF16)? Without those
    instructions torch emulates bf16 and it runs slower than fp32 (PITFALLS.md, CPU speed)."""
    flags = _flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fp32_packing_pays(cpuinfo: str | None = None) -> bool:
    """fp32 weights are packed on an AMD CPU with AVX2 (a Zen 3 without AVX-512, a Zen 5
    with it) and on any CPU with AVX2 and without AVX-512, where MKL's sgemm is slow at a
    decode step's few rows (the module docstring). An Intel CPU with AVX-512 keeps sgemm:
    not measured there."""
    flags = _flags(cpuinfo)
    return "avx2" in flags and ("avx512f" not in flags or "AuthenticAMD" in flags)


def _flags(cpuinfo: str | None) -> frozenset[str]:
    return _this_cpu_flags() if cpuinfo is None else frozenset(cpuinfo.split())


@functools.lru_cache(maxsize=1)
def _this_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return frozenset(fh.read().split())
    except OSError:
        return frozenset()


def _ops() -> tuple[Any, Any] | None:
    """The private oneDNN ops, or None where this torch lacks them."""
    if not torch.backends.mkldnn.is_available():
        return None
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        reorder = getattr(mkldnn, "_reorder_linear_weight", None)
        linear = getattr(mkldnn, "_linear_pointwise", None)
    except (AttributeError, RuntimeError):  # torch.ops raises on an unknown op
        return None
    if reorder is None or linear is None:
        return None
    return reorder, linear


_TOLERANCE = {torch.bfloat16: (0.05, 0.02), torch.float32: (1e-4, 1e-4)}  # atol, rtol


@functools.lru_cache(maxsize=len(PACKED_DTYPES))
def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """The ops exist and give F.linear's answer on a small case in ``dtype`` (with a bias,
    2-D and 3-D input), checked once per process and dtype."""
    ops = _ops()
    if ops is None or dtype not in PACKED_DTYPES:
        return False
    reorder, linear = ops
    atol, rtol = _TOLERANCE[dtype]
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=gen).to(dtype)
        bias = torch.randn(24, generator=gen).to(dtype)
        x = torch.randn(2, 3, 16, generator=gen).to(dtype)
        packed = reorder(weight)
        for inp in (x, x[0]):
            got = linear(inp, packed, bias, "none", [], "")
            want = F.linear(inp, weight, bias)
            if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol):
                return False
        return bool(torch.equal(packed.to_dense(), weight))
    except Exception as exc:  # a build without oneDNN bf16, a changed signature...
        logger.info("prepacked %s Linear weights are not available in this torch: %s", dtype, exc)
        return False


def wanted(model: Any, device: torch.device) -> bool:
    """Whether packing pays and is safe for ``model`` on ``device`` (see the module docstring)."""
    dtype = getattr(model, "dtype", None)
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return cpu_computes_bf16() and available(dtype)
    if dtype == torch.float32:
        return fp32_packing_pays() and available(dtype)
    return False


def is_packed(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and any(hasattr(m, _ATTR) for m in model.modules())


def _packable(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Linear
        and isinstance(weight, torch.Tensor)
        and weight.dtype == dtype
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.layout == torch.strided
        and not hasattr(module, _ATTR)
    )


def _packed_forward(module: torch.nn.Linear, linear: Any, dtype: torch.dtype) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        packed = getattr(module, _ATTR)
        if x.dtype != dtype or x.device.type != "cpu":  # not the case packing is for
            return F.linear(x, packed.to_dense().to(x.dtype), module.bias)
        if not x.is_contiguous():
            x = x.contiguous()
        return linear(x, packed, module.bias, "none", [], "")

    return forward


def _placeholder(weight: torch.Tensor) -> torch.Tensor:
    """The plain weight's shape, dtype and device over one element (no memory)."""
    return torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)


def _trim() -> None:
    """Hand the released plain weights back to the system: glibc keeps freed blocks in its
    heap (SmolLM2's resident memory grew 250 MB with packing before this, 40 MB after:
    its tied output layer). Best effort; nothing where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Group:
    """Sibling Linear layers that read the same input (a layer's q/k/v projections, an MLP's
    gate and up projections), packed as one weight: the first of them called on an input
    computes every sibling's output in one oneDNN call, and each sibling called on that same
    tensor takes its slice (a view: no copy). A sibling called on another tensor, or twice
    on one, computes it again: the answer never depends on the order of the calls. What was
    computed is kept per thread and dropped once every sibling took its part."""

    def __init__(
        self, packed: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], linear: Any
    ) -> None:
        self.packed, self.bias, self.sizes, self.linear = packed, bias, sizes, linear
        self.local = threading.local()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        state = self.local
        if getattr(state, "input", None) is not x or index in state.taken:
            inp = x if x.is_contiguous() else x.contiguous()
            out = self.linear(inp, self.packed, self.bias, "none", [], "")
            state.input, state.parts, state.taken = x, out.split(self.sizes, dim=-1), set()
        state.taken.add(index)
        part: torch.Tensor = state.parts[index]
        if len(state.taken) == len(self.sizes):
            state.input = state.parts = None
        return part

    def dense(self) -> list[torch.Tensor]:
        """Each sibling's plain weight, exactly as it was packed."""
        return [w.clone() for w in self.packed.to_dense().split(self.sizes, dim=0)]


@dataclass(frozen=True)
class _Member:
    """What a fused sibling holds in place of its own packed weight."""

    group: _Group
    index: int


def _fused_forward(module: torch.nn.Linear, member: _Member, dtype: torch.dtype) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype or x.device.type != "cpu":  # not the case packing is for
            weight = member.group.dense()[member.index]
            return F.linear(x, weight.to(x.dtype), module.bias)
        return member.group.output(member.index, x)

    return forward


def _siblings(model: Any, packable: set[int]) -> list[list[torch.nn.Linear]]:
    """The groups ``pack`` fuses: on the model types whose modeling code was read
    (``FUSED_MODEL_TYPES``), each module's q/k/v projections and gate/up projections, when
    all of a group are packable, read inputs of one width, and either all or none have a
    bias."""
    if getattr(getattr(model, "config", None), "model_type", None) not in FUSED_MODEL_TYPES:
        return []
    groups = []
    for parent in model.modules():
        for names in FUSED_NAMES:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, torch.nn.Linear) and id(m) in packable for m in members):
                continue
            linears: list[torch.nn.Linear] = members  # type: ignore[assignment]
            if len({m.in_features for m in linears}) == 1 and len({m.bias is None for m in linears}) == 1:
                groups.append(linears)
    return groups


def pack(model: Any) -> int:
    """Pack every Linear of ``model`` in the model's dtype (bf16 or fp32) in place (see the
    module docstring), the siblings of ``_siblings`` as one weight each; the number of
    Linear modules packed. Nothing (0) when the ops are not available for that dtype, or for
    any other dtype."""
    dtype = getattr(model, "dtype", None)
    ops = _ops()
    if ops is None or dtype not in PACKED_DTYPES or not available(dtype):
        return 0
    reorder, linear = ops
    with _lock:
        start = time.perf_counter()
        modules = [m for m in model.modules() if _packable(m, dtype)]
        counts: dict[int, int] = {}
        for m in model.modules():  # a weight other modules hold too (tied embeddings) stays
            for p in m.parameters(recurse=False):
                counts[id(p)] = counts.get(id(p), 0) + 1
        alone = {id(m) for m in modules if counts.get(id(m.weight), 0) <= 1}
        groups = _siblings(model, alone)
        grouped = {id(m) for group in groups for m in group}
        shared = 0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the reorders run faster on one thread (the module docstring)
        try:
            with torch.no_grad():
                for group in groups:
                    weight = torch.cat([m.weight.detach() for m in group])
                    bias = None if group[0].bias is None else torch.cat([m.bias.detach() for m in group])
                    fused = _Group(reorder(weight), bias, [m.out_features for m in group], linear)
                    for index, m in enumerate(group):
                        member = _Member(fused, index)
                        setattr(m, _ATTR, member)
                        m.weight.data = _placeholder(m.weight)
                        m.forward = _fused_forward(m, member, dtype)  # type: ignore[method-assign]
                for m in modules:
                    if id(m) in grouped:
                        continue
                    weight = m.weight
                    setattr(m, _ATTR, reorder(weight.detach()))
                    if id(m) in alone:
                        weight.data = _placeholder(weight)
                    else:
                        shared += 1
                    m.forward = _packed_forward(m, linear, dtype)
        finally:
            torch.set_num_threads(threads)
        _trim()
        logger.info(
            "packed %d %s Linear weights for oneDNN in %.2f s (%d groups fused, %d shared kept beside)",
            len(modules),
            dtype,
            time.perf_counter() - start,
            len(groups),
            shared,
        )
        return len(modules)


def unpack(model: Any) -> int:
    """Undo ``pack``: every packed Linear gets its dense weight and its class's forward
    back; the number restored (0 for anything that is not a torch module: nothing to undo)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    with _lock:
        restored = 0
        dense: dict[int, list[torch.Tensor]] = {}  # each fused group's weights, once
        with torch.no_grad():
            for m in model.modules():
                packed = getattr(m, _ATTR, None)
                if packed is None:
                    continue
                weight: Any = m.weight
                if isinstance(packed, _Member):
                    found = dense.setdefault(id(packed.group), packed.group.dense())
                    weight.data = found[packed.index]
                elif weight.stride() == (0, 0):  # released by pack (a shared one was kept)
                    weight.data = packed.to_dense()
                delattr(m, _ATTR)
                if "forward" in m.__dict__:
                    del m.__dict__["forward"]
                restored += 1
        if restored:
            logger.info("unpacked %d Linear weights", restored)
        return restored


def apply(model: Any, device: torch.device, enabled: bool) -> bool:
    """Bring ``model`` to the state an engine call wants: packed when ``enabled`` and
    ``wanted``, else plain; whether it is packed."""
    if enabled and wanted(model, device):
        if not is_packed(model):
            pack(model)
        return True
    if is_packed(model):
        unpack(model)
    return False
