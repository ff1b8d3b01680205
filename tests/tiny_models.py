"""Tiny random language models built offline, for tests.

Each builder writes a model folder (config, safetensors weights, tokenizer) that
``from_pretrained`` and ``lmjobs.worker.models.load_model`` read like any Hugging Face
checkpoint, and returns its path. Everything is seeded: the same call gives the same files.
The builders live with the benchmark's random models (``lmjobs.bench.models``, installed),
so the two share one tokenizer trainer and one weight initializer.
"""

from __future__ import annotations

from typing import Any

import torch

from lmjobs.bench.models import INIT_STD, build_tiny_causal, build_tiny_seq2seq
from lmjobs.bench.tokenizer import CORPUS, MAX_POSITIONS, VOCAB_SIZE, build_tokenizer
from lmjobs.bench.tokenizer import TINY_CHAT_TEMPLATE as CHAT_TEMPLATE

__all__ = [
    "CHAT_TEMPLATE",
    "PROMPTS",
    "CORPUS",
    "INIT_STD",
    "MAX_POSITIONS",
    "VOCAB_SIZE",
    "build_tiny_causal",
    "build_tiny_seq2seq",
    "build_tokenizer",
    "random_qwen2",
]

# Prompts of mixed lengths and languages (a one-token prompt, German, numbers) that the
# engine tests run through every path and compare.
PROMPTS = [
    "The quick brown fox",
    "Bitte übersetze diesen Satz ins Deutsche, danke schön und gute Nacht.",
    "Hi",
    "Numbers like 42, 2024 and 3.14 appear in many texts. One, two, three, four, five.",
    "Guten Morgen!",
    "A",
    "What is the capital of France? The capital of France is",
    "Workers pull jobs from the queue",
]


def random_qwen2(dtype: torch.dtype, *, hidden: int = 96, heads: int = 6, std: float = 0.2) -> Any:
    """A tiny random Qwen2 in memory (no tokenizer, vocabulary 97): biases on q/k/v, none on
    o, two KV heads (``heads`` / 2 query heads each), every parameter drawn N(0, ``std``)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.to(dtype).eval()
