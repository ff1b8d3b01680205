"""Random-weight models built offline: real shapes for the benchmark, tiny ones for tests.

A benchmark of speed needs the shapes of a real model (layers, heads, hidden and
vocabulary sizes decide the cost of a step), not its knowledge. ``build_random_model``
writes a model folder that ``load_model`` reads like any checkpoint: a config of a named
shape (``SHAPES``), seeded random weights, and a tokenizer (``trained``: a byte-level BPE
trained here; ``smollm2``: SmolLM2's, from the converted alias folder), built once into a
cache folder.

``build_tiny_causal`` (llama, gpt2) and ``build_tiny_seq2seq`` (t5) write the tests' tiny
models (64 wide, 2 layers, ~500 ids) to a folder the test names.

Both draw their weights with ``randomize``, seeded, so the same call gives the same files;
its two scales and why are in docs/benchmarks.md ("Notes from the benchmark code").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmjobs.bench.tokenizer import MAX_POSITIONS, build_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# name -> config fields; "vocab_size": None means the tokenizer's size.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "llama-1b": {  # Llama-3.2-1B
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500_000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
EMBED_STD = 0.02  # benchmark models: embeddings (matrices: 1/sqrt(fan_in))
INIT_STD = 0.08  # tiny test models: every matrix, embeddings included
INIT_VERSION = 2  # in the cached folder's name: bump when ``randomize`` changes for benchmarks


def make_config(shape: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r} (use one of {sorted(SHAPES)})")
    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    fields["vocab_size"] = max(fields["vocab_size"] or 0, len(tokenizer))
    fields["max_position_embeddings"] = min(fields["max_position_embeddings"], 32768)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config: PretrainedConfig = AutoConfig.for_model(
        model_type,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=pad,
        **fields,
    )
    return config


def _is_norm_weight(name: str) -> bool:
    """Layer and RMS norm scales: "norm" in llama, qwen2 and t5 names; ln_* in gpt2's."""
    if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight")):
        return True
    return "ln_f" in name and name.endswith("weight")


@torch.no_grad()
def randomize(
    model: PreTrainedModel, *, eos_id: int, seed: int, std: float | None = None, real_vocab: int | None = None
) -> None:
    """Redraw every weight from a seeded normal; norm scales 1, biases 0.

    ``std``: one standard deviation for every matrix, embeddings included (the tiny test
    models); ``None``: 1/sqrt(fan_in) for matrices and ``EMBED_STD`` for embeddings (the
    benchmark's shapes). The output row of EOS is zeroed (its logit stays 0, so greedy
    decoding does not stop at once; for T5, whose output layer is tied, the EOS input
    embedding is zero too), and so are the rows from ``real_vocab`` on, ids the tokenizer
    does not have.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = _output_weight(model)  # [V, hidden]
    embeddings = {id(model.get_input_embeddings().weight), id(out)}
    for name, param in model.named_parameters():
        if std is None and id(param) in embeddings:
            scale = EMBED_STD
        elif param.ndim >= 2:
            scale = std if std is not None else param.shape[-1] ** -0.5
        elif _is_norm_weight(name):
            param.fill_(1.0)
            continue
        else:  # biases
            param.zero_()
            continue
        noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
        param.copy_(noise * scale)
    out[eos_id] = 0.0
    if real_vocab is not None:
        out[real_vocab:] = 0.0
    model.eval()


def _output_weight(model: PreTrainedModel) -> torch.Tensor:
    layer = model.get_output_embeddings()
    if layer is None or not isinstance(layer.weight, torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output layer to zero EOS in")
    return layer.weight


def save_folder(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: Path) -> Path:
    """Weights (safetensors), config and tokenizer in ``path``; return it."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def model_folder(cache_dir: Path, shape: str, tokenizer: str, dtype: torch.dtype, seed: int) -> Path:
    name = str(dtype).removeprefix("torch.")
    return Path(cache_dir) / "bench" / f"{shape}-{tokenizer}-{name}-seed{seed}-v{INIT_VERSION}"


def build_random_model(
    shape: str,
    *,
    cache_dir: Path,
    tokenizer: str = "trained",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """The folder of a random model of ``shape`` in ``cache_dir/bench``, built once.

    Built in a temporary folder and renamed into place, so a reader never sees half a
    model. ``device``: where the weights are drawn (a GPU draws 0.5B weights in a blink).
    """
    from transformers import AutoModelForCausalLM

    target = model_folder(cache_dir, shape, tokenizer, dtype, seed)
    if (target / "config.json").is_file():
        return target
    tok = load_tokenizer(tokenizer, cache_dir)
    config = make_config(shape, tok)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    eos = tok.eos_token_id
    if not isinstance(eos, int):
        raise ValueError(f"the {tokenizer} tokenizer has no EOS token")
    randomize(model, real_vocab=len(tok), eos_id=eos, seed=seed)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = config.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_folder(model.to("cpu"), tok, tmp)
        (tmp / "lmjobs-bench.json").write_text(
            json.dumps({"shape": shape, "tokenizer": tokenizer, "seed": seed, "random": True})
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_causal(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random causal LM (``arch`` "llama" or "gpt2") to ``path``; return it."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    path = Path(path)
    tok = build_tokenizer(arch=arch, seed=seed)
    common = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }
    config: PretrainedConfig
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=tok.pad_token_id,
            **common,
        )
    elif arch == "gpt2":  # no pad token, as GPT-2
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **common)
    else:
        raise ValueError(f"unknown causal arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, eos_id=_eos(tok), seed=seed, std=INIT_STD)
    return save_folder(model, tok, path)


def build_tiny_seq2seq(path: str | Path, arch: str = "t5", seed: int = 0) -> Path:
    """Write a tiny random encoder-decoder (T5) to ``path``; return it."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    if arch != "t5":
        raise ValueError(f"unknown seq2seq arch {arch!r}")
    path = Path(path)
    tok = build_tokenizer(arch=arch, seed=seed)
    # T5 ties its output layer to the input embeddings whatever the config says (in 5.x);
    # n_positions is not a T5Config argument but is read back as the context length.
    t5_args: dict[str, Any] = dict(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        n_positions=MAX_POSITIONS,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    config = T5Config(**t5_args)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    randomize(model, eos_id=_eos(tok), seed=seed, std=INIT_STD)
    return save_folder(model, tok, path)


def _eos(tok: PreTrainedTokenizerBase) -> int:
    eos = tok.eos_token_id
    if not isinstance(eos, int):
        raise ValueError("the tokenizer has no EOS token")
    return eos


def parameter_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones once),
    except an input embedding table that is not also the output layer (a step reads only
    B of its rows)."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is inp
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (param is inp and not tied):
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    for buf in model.buffers():  # int8 dynamic quantization keeps packed weights here
        total += buf.numel() * buf.element_size()
    return total
