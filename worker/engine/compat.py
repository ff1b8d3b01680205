"""Everything lmjobs takes from transformers beyond its documented top-level API, in one place.

transformers moves its internals within a major version: 5.24 dropped ``DynamicLayer.dtype``
(a subclass that read it failed every request), 5.17 names ``ContinuousBatchingConfig.block_size``
what later minors call ``page_size``, and 5.17's SDPA path repeats grouped KV heads for decode
where later minors reshape the query. The engine, ``worker/models.py`` (and the benchmarks)
import such names from here only, so a new release is adapted to in this module, and
``check()`` tells at model load, in one message naming the installed version, what is
missing, instead of every request failing with an AttributeError.

Every import is guarded: a name that a release lacks becomes ``None`` (a placeholder class
for base classes) and is listed by ``check()``; importing the engine never fails on it.

Tested (``.ci/smoke-versions`` and ``.ci/constraints.txt``): transformers 5.17.0 to 5.25.0,
torch 2.11.0 to 2.15.0 (the ranges pyproject.toml declares). 5.25 changed nothing the engine
uses; its ``from_pretrained`` kernelizes every model by default (the ``kernels`` package): Hub
kernels replace some layers' forwards where a device_map puts the model on a GPU (the split
device), none on the CPU or in a model moved to a GPU after loading; ``USE_HUB_KERNELS=0``
turns that off.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection
from typing import Any

import torch
import transformers

from lmjobs.jobs.errors import ModelLoadError

TRANSFORMERS_VERSION: str = transformers.__version__
TESTED_TRANSFORMERS = ">=5.17,<5.26"  # what CI runs; pyproject.toml declares the same

_missing: list[str] = []


def _import(module: str, name: str) -> Any:
    """``module.name``, or None (recorded for ``check``) when this release lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        _missing.append(f"{module}.{name}")
        return None


class _Absent:
    """Stands in for a missing base class so that modules subclassing it still import;
    ``check()`` refuses to load a model before any instance is made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ModelLoadError(missing_message())


# --- KV cache ------------------------------------------------------------------------------
DynamicLayer: Any = _import("transformers.cache_utils", "DynamicLayer") or _Absent
StaticCache: Any = _import("transformers", "StaticCache")

# what the engine's GrowingLayer calls on or inherits from DynamicLayer; each one is a
# method of every tested release
_LAYER_METHODS = (
    "lazy_initialization",
    "update",
    "get_seq_length",
    "get_mask_sizes",
    "batch_select_indices",
    "batch_repeat_interleave",
    "crop",
    "reset",
)


def layer_dtype_device(layer: Any) -> tuple[torch.dtype, torch.device]:
    """dtype and device of a filled cache layer, read from its keys: ``DynamicLayer.dtype``
    is gone since 5.24 (``device`` may follow)."""
    keys = layer.keys
    if isinstance(keys, torch.Tensor):
        return keys.dtype, keys.device
    return getattr(layer, "dtype", torch.float32), getattr(layer, "device", torch.device("cpu"))


def cache_layers(cache: Any) -> list[Any] | None:
    """The per-layer objects of a ``Cache`` (``cache.layers`` in every 5.x release tested)."""
    layers = getattr(cache, "layers", None)
    return layers if isinstance(layers, list) else None


# --- model inputs and outputs --------------------------------------------------------------
BaseModelOutput: Any = _import("transformers.modeling_outputs", "BaseModelOutput")


def cache_argument(forward_params: Collection[str]) -> str:
    """The forward keyword that takes the KV cache, from the forward's parameter names:
    ``cache`` since 5.24 (``past_key_values`` still maps to it there, with a warning that it
    goes in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in forward_params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned: ``output.cache`` since 5.24, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


# --- attention and mask registries ---------------------------------------------------------
AttentionInterface: Any = _import("transformers", "AttentionInterface")
AttentionMaskInterface: Any = _import("transformers.masking_utils", "AttentionMaskInterface")
sdpa_attention_forward: Any = _import("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
sdpa_mask: Any = _import("transformers.masking_utils", "sdpa_mask")


def register_attention(name: str, attention: Callable[..., Any], mask: Callable[..., Any]) -> bool:
    """Register an attention function and its mask builder under ``name``; False when this
    release lacks a registry (``check()`` names it). Models pick them by setting
    ``config._attn_implementation = name``."""
    if AttentionInterface is None or AttentionMaskInterface is None:
        return False
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return True


# --- generation config and logits processors -----------------------------------------------
GenerationConfig: Any = _import("transformers", "GenerationConfig")
_LP = "transformers.generation.logits_process"
LogitsProcessorList: Any = _import(_LP, "LogitsProcessorList")
SequenceBiasLogitsProcessor: Any = _import(_LP, "SequenceBiasLogitsProcessor")
EncoderRepetitionPenaltyLogitsProcessor: Any = _import(_LP, "EncoderRepetitionPenaltyLogitsProcessor")
RepetitionPenaltyLogitsProcessor: Any = _import(_LP, "RepetitionPenaltyLogitsProcessor")
NoRepeatNGramLogitsProcessor: Any = _import(_LP, "NoRepeatNGramLogitsProcessor")
EncoderNoRepeatNGramLogitsProcessor: Any = _import(_LP, "EncoderNoRepeatNGramLogitsProcessor")
NoBadWordsLogitsProcessor: Any = _import(_LP, "NoBadWordsLogitsProcessor")
MinLengthLogitsProcessor: Any = _import(_LP, "MinLengthLogitsProcessor")
MinNewTokensLengthLogitsProcessor: Any = _import(_LP, "MinNewTokensLengthLogitsProcessor")
ForcedBOSTokenLogitsProcessor: Any = _import(_LP, "ForcedBOSTokenLogitsProcessor")
ForcedEOSTokenLogitsProcessor: Any = _import(_LP, "ForcedEOSTokenLogitsProcessor")
ExponentialDecayLengthPenalty: Any = _import(_LP, "ExponentialDecayLengthPenalty")
SuppressTokensLogitsProcessor: Any = _import(_LP, "SuppressTokensLogitsProcessor")
SuppressTokensAtBeginLogitsProcessor: Any = _import(_LP, "SuppressTokensAtBeginLogitsProcessor")
LogitNormalization: Any = _import(_LP, "LogitNormalization")


def make_processor(cls: Any, *args: Any, **optional: Any) -> Any:
    """``cls(*args, **optional)``, passing only the optional keyword arguments this
    release's constructor takes (``device=`` came and went between minors)."""
    accepted = inspect.signature(cls.__init__).parameters
    return cls(*args, **{k: v for k, v in optional.items() if k in accepted})


# --- continuous batching (the benchmarks' A6 arm) ------------------------------------------
def continuous_batching_config(**kwargs: Any) -> Any:
    """A ``ContinuousBatchingConfig``; ``page_size`` is passed as ``block_size`` where the
    release names it so (5.17)."""
    cls = _import("transformers", "ContinuousBatchingConfig")
    if cls is None:
        raise ModelLoadError(missing_message())
    accepted = inspect.signature(cls.__init__).parameters
    if "page_size" in kwargs and "page_size" not in accepted and "block_size" in accepted:
        kwargs["block_size"] = kwargs.pop("page_size")
    return cls(**kwargs)


def continuous_batching_page_size(config: Any = None) -> int:
    """Tokens per page of a ContinuousBatchingConfig (``page_size``, ``block_size`` in 5.17)."""
    config = config if config is not None else continuous_batching_config()
    for name in ("page_size", "block_size"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ModelLoadError(f"transformers {TRANSFORMERS_VERSION}: ContinuousBatchingConfig has no page size")


# --- GGUF (the smollm2-135m alias without accelerate) --------------------------------------


def load_gguf_checkpoint(path: str, model: Any) -> dict[str, Any]:
    """The tensors of a GGUF file, dequantized for ``model`` (transformers' own reader)."""
    reader = _import("transformers.modeling_gguf_pytorch_utils", "load_gguf_checkpoint")
    if reader is None:
        raise ModelLoadError(missing_message())
    tensors: dict[str, Any] = reader(path, return_tensors=True, model_to_load=model)["tensors"]
    return tensors


# --- the check at model load ---------------------------------------------------------------


def missing() -> list[str]:
    """What the engine needs and this transformers release lacks (empty when all is there)."""
    found = list(dict.fromkeys(_missing))
    if DynamicLayer is not _Absent:
        found += [f"DynamicLayer.{m}" for m in _LAYER_METHODS if not callable(getattr(DynamicLayer, m, None))]
        found += _probe_layer()
    if AttentionInterface is not None and not callable(getattr(AttentionInterface, "register", None)):
        found.append("AttentionInterface.register")
    return found


def _probe_layer() -> list[str]:
    """Fill a plain DynamicLayer with one column and read it back as the engine does."""
    try:
        layer = DynamicLayer()
        k = torch.zeros(1, 1, 1, 2)  # [B, H, T, D]
        layer.update(k, k)
        dtype, _ = layer_dtype_device(layer)
        ok = layer.is_initialized and layer.keys.shape == k.shape and dtype == k.dtype
        return [] if ok else ["DynamicLayer.update (keys/values/is_initialized as 5.17-5.25 keep them)"]
    except Exception as exc:  # any failure here is what check() must report
        return [f"DynamicLayer ({type(exc).__name__}: {exc})"]


def missing_message(names: list[str] | None = None) -> str:
    names = missing() if names is None else names
    return (
        f"transformers {TRANSFORMERS_VERSION} lacks what lmjobs' engine uses: {', '.join(names)} "
        f"(tested: transformers{TESTED_TRANSFORMERS}; install a release in that range)"
    )


def check() -> None:
    """Raise ModelLoadError, naming the installed transformers version and everything
    missing, when this release cannot run the engine."""
    names = missing()
    if names:
        raise ModelLoadError(missing_message(names))
