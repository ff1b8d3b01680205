"""Random-weight models of real shapes, built offline for benchmarks.

A benchmark of speed needs the shapes of a real model (layers, heads, hidden and
vocabulary sizes decide the cost of a step), not its knowledge. ``build_random_model``
writes a model folder that ``load_model`` reads like any checkpoint: a config of a named
shape, seeded random weights, and a tokenizer.

Weights are drawn so that decoding is well behaved and runs to ``max_new_tokens``:
matrices with std 1/sqrt(fan_in) (activations stay near unit scale, nothing underflows
into denormals) and embeddings with std 0.02, the usual initializer range. (Embeddings of
std 1 make a tied model's residual stream mostly its input token, so it copies that token
forever: a degenerate output that would make the correctness check trivially true.) The
output rows of EOS and of every id the tokenizer does not have are zeroed: their logit is
exactly 0 while the best real token's is several standard deviations above it, so the
model never stops early and never writes an id the tokenizer cannot decode, while the
output layer keeps the shape's full vocabulary (its cost).

Tokenizers: ``trained`` is a byte-level BPE trained here on a small English corpus (no
files needed); ``smollm2`` reuses SmolLM2's tokenizer from the converted alias folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

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
TOKENIZERS = ("trained", "smollm2")
EMBED_STD = 0.02
INIT_VERSION = 2  # in the cached folder's name: bump when ``randomize`` changes
TRAINED_VOCAB = 2048
CONTEXT = 4096  # model_max_length of the trained tokenizer

# ChatML-like template, so chat workloads render through a template as with real models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their time people year way day "
    "man thing woman life child world school state family student group country problem hand "
    "part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member "
    "law car city community name president team minute idea kid body information back parent "
    "face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education river mountain train station "
    "language model batch queue worker result table answer translate summary question report "
    "make go know take see come think look want give use find tell ask seem feel try leave call "
    "good new first last long great little own other old big high different small large next "
    "early young important few public bad same able quickly slowly often never always today "
    "because although while after before during under over between through against without"
).split()


def corpus_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic word-salad sentences: enough text to train a BPE and build prompts."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    return out


def build_trained_tokenizer(vocab_size: int = TRAINED_VOCAB) -> Any:
    """A byte-level BPE (``<pad>`` 0, ``</s>`` 1 = EOS, ``<s>`` 2) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_sentences(2000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
    )
    fast.model_max_length = CONTEXT
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(kind: str, cache_dir: Path) -> Any:
    if kind == "trained":
        return build_trained_tokenizer()
    if kind == "smollm2":
        from transformers import AutoTokenizer

        from lmjobs.worker.models import ensure_smollm2

        return AutoTokenizer.from_pretrained(ensure_smollm2(Path(cache_dir)))
    raise ValueError(f"unknown tokenizer {kind!r} (use one of {TOKENIZERS})")


def make_config(shape: str, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r} (use one of {sorted(SHAPES)})")
    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    fields["vocab_size"] = max(fields["vocab_size"] or 0, len(tokenizer))
    fields["max_position_embeddings"] = min(fields["max_position_embeddings"], 32768)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return AutoConfig.for_model(
        model_type,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=pad,
        **fields,
    )


@torch.no_grad()
def randomize(model: Any, *, real_vocab: int, eos_id: int, seed: int) -> None:
    """Redraw every weight (see the module docstring); zero unreachable output rows."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for name, param in model.named_parameters():
        if id(param) in embeddings:
            std = EMBED_STD
        elif param.ndim >= 2:
            std = param.shape[-1] ** -0.5
        elif "norm" in name:
            param.fill_(1.0)
            continue
        else:  # biases
            param.zero_()
            continue
        noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
        param.copy_(noise * std)
    out = model.get_output_embeddings().weight  # [V, hidden]
    out[eos_id] = 0.0
    out[real_vocab:] = 0.0


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
    randomize(model, real_vocab=len(tok), eos_id=int(tok.eos_token_id), seed=seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
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
