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
    "CORPUS",
    "INIT_STD",
    "MAX_POSITIONS",
    "VOCAB_SIZE",
    "build_tiny_causal",
    "build_tiny_seq2seq",
    "build_tokenizer",
]
