"""What the engine feeds the model, without torch: a request as text, a model's context length.

The engine (``batching``) and the dry run's token counter (``worker/token_count.py``) both
render through :func:`render`, so a dry-run estimate counts the tokens the engine will run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmjobs.jobs.engine_api import GenRequest

# Config fields that name the context length, in the order models use them.
CONTEXT_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
)
DEFAULT_CONTEXT = 2048


def render(request: GenRequest, tokenizer: Any) -> tuple[str, bool]:
    """The request as text, and whether the tokenizer should add its special tokens.

    Chat messages go through the tokenizer's chat template (which writes BOS and turn
    markers itself); without a template their contents are joined as plain text.
    """
    if request.messages is not None:
        messages = [dict(m) for m in request.messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return str(text), False
        return "\n\n".join(str(m.get("content", "")) for m in messages), True
    if request.prompt is None:
        raise ValueError("request has neither prompt nor messages")
    return request.prompt, True


def declared_context_length(field: Callable[[str], Any], tokenizer: Any = None) -> int | None:
    """The longest sequence the model takes, from a config's fields (``field(name)``) or
    its tokenizer's limit; None when neither says."""
    for name in CONTEXT_FIELDS:
        value = field(name)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def context_length(config: Any, tokenizer: Any = None) -> int:
    """:func:`declared_context_length` of a transformers config, else ``DEFAULT_CONTEXT``."""
    found = declared_context_length(lambda name: getattr(config, name, None), tokenizer)
    return found if found is not None else DEFAULT_CONTEXT
