"""Tiny random language models built offline, for tests.

Each builder writes a model folder (config, safetensors weights, tokenizer) that
``from_pretrained`` and ``lmjobs.worker.models.load_model`` read like any Hugging Face
checkpoint, and returns its path. Everything is seeded: the same call gives the same files.
The builders live with the benchmark's random models (``lmjobs.bench.models``, installed),
so the two share one tokenizer trainer and one weight initializer.
"""

from __future__ import annotations

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
