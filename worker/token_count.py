"""Count tokens the way the engine will, with the model's tokenizer only (no weights).

For ``lmjobs submit --dry-run``: the jobs service gets a ``count_tokens`` callable and
never imports transformers itself. This module does not import torch (transformers may,
when torch is installed), and it never downloads: a Hugging Face id must already be in
the local cache, or the dry run falls back to a marked guess. A dry run should cost
seconds, not a download (or, offline, a minute of retries).

Rendering follows ``worker/batching.py`` (``render``/``tokenize``): chat messages go
through the tokenizer's chat template (which writes its own special tokens), a plain
prompt gets the tokenizer's special tokens. ``tests/jobs/test_estimate.py`` checks the
counts equal the engine's. (``batching`` imports torch, hence the small copy here.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmjobs.jobs.engine_api import SMOLLM2_ALIAS, GenRequest
from lmjobs.jobs.errors import ModelLoadError
from lmjobs.worker.engine.prompts import declared_context_length, render


@dataclass
class TokenCounter:
    """``count(requests) -> tokens per request``, plus what the model's config says."""

    tokenizer: Any
    source: str
    context_length: int | None
    is_seq2seq: bool

    def __call__(self, requests: Sequence[GenRequest]) -> list[int]:
        groups: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
        for i, request in enumerate(requests):
            text, special = render(request, self.tokenizer)
            groups[special].append((i, text))
        out = [0] * len(requests)
        for special, items in groups.items():
            if items:
                enc = self.tokenizer([t for _, t in items], add_special_tokens=special)
                for (i, _), ids in zip(items, enc["input_ids"], strict=True):
                    out[i] = len(ids)
        return out


def model_source(model: str, cache_dir: Path) -> str:
    """A folder or a Hugging Face id; the alias is converted (once) into ``cache_dir``."""
    if model == SMOLLM2_ALIAS:
        folder = cache_dir / SMOLLM2_ALIAS
        if (folder / "config.json").is_file():
            return str(folder)
        from lmjobs.worker.models import ensure_smollm2  # converts the GGUF (needs torch)

        return str(ensure_smollm2(cache_dir))
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist")
    return model


def _config(source: str, trust_remote_code: bool) -> dict[str, Any]:
    path = Path(source) / "config.json"
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    return dict(cfg.to_dict())


def load_token_counter(model: str, *, cache_dir: Path, trust_remote_code: bool = False) -> TokenCounter:
    """The tokenizer of ``model`` from disk. Raises ModelLoadError with one line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        source = model_source(model, Path(cache_dir))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
        config = _config(source, trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load the tokenizer of {model} from disk: {first}") from None
    return TokenCounter(
        tokenizer=tokenizer,
        source=source,
        context_length=declared_context_length(config.get, tokenizer),
        is_seq2seq=bool(config.get("is_encoder_decoder", False)),
    )
