"""Constrained decoding (``SamplingParams.output_format``) with llguidance, and the exact
bytes of tokens (log-probabilities).

One ``Grammars`` per (tokenizer, logits width, EOS ids), kept for the life of the worker
(``grammars_for``): it holds llguidance's view of the tokenizer (built once: about a
second for a real vocabulary) and a cache of compiled grammars keyed by the OutputFormat
(frozen, hashable): a pristine ``LLMatcher`` per format, ``deep_copy()``'d for each row,
so a format is compiled once per worker however many requests and calls use it. Compile
time is counted apart (``GrammarStats``) and logged by the engine, never folded into
decode time.

Grammars by kind:

- ``json_object``: the JSON schema ``{"type": "object"}``;
- ``json_schema``: llguidance's JSON-schema compiler on the schema text;
- ``choice``: a Lark grammar ``start: "a" | "b" ...`` (each choice a JSON-escaped literal);
- ``regex``: llguidance's regex grammar (the whole answer matches).

JSON is compiled without free whitespace between tokens (``whitespace_flexible`` off):
the answer is compact JSON, and a model cannot pad it with blanks until max_new_tokens.

Masks are llguidance's token bitmasks, one int32 word per 32 token ids, sized to the
logits (a model's logits may be wider than its tokenizer's vocabulary: ids past the
vocabulary are never allowed). ``mask_logits`` fills the rows of the constrained rows
only and sets every disallowed logit to -inf.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmjobs.jobs.engine_api import OutputFormat

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# compact JSON: no free whitespace (see the module docstring)
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


@dataclass
class GrammarStats:
    """What grammar work cost so far in this process (all tokenizers)."""

    compiled: int = 0  # formats compiled (cache misses)
    compile_s: float = 0.0  # seconds spent compiling them (and building token tables)
    cache_hits: int = 0  # matchers handed out from an already compiled format
    failed: int = 0  # formats that did not compile
    masked_rows: int = 0  # row-steps masked (one per constrained row and decode step)
    step_s: float = 0.0  # seconds computing and applying masks and advancing matchers

    def snapshot(self) -> GrammarStats:
        return GrammarStats(
            self.compiled, self.compile_s, self.cache_hits, self.failed, self.masked_rows, self.step_s
        )


STATS = GrammarStats()
_LOCK = threading.Lock()


def grammar_text(fmt: OutputFormat) -> str:
    """llguidance's grammar for ``fmt``; ValueError when the spec is not what its kind needs."""
    import llguidance

    if fmt.kind == "json_object":
        return str(llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS))
    if fmt.kind == "json_schema":
        try:
            schema = json.loads(fmt.spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be a JSON object")
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    if fmt.kind == "choice":
        try:
            choices = json.loads(fmt.spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the choices are not a JSON list: {exc}") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("choice needs a non-empty JSON list of strings")
        literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return str(llguidance.LLMatcher.grammar_from_lark(f"start: {literals}"))
    return str(llguidance.LLMatcher.grammar_from_regex(fmt.spec))


class Grammars:
    """llguidance's tokenizer and the compiled formats of one (tokenizer, width, EOS)."""

    def __init__(self, tokenizer: Any, width: int, eos_ids: Collection[int]) -> None:
        import llguidance
        import llguidance.hf

        self.width = width
        self._vocab = len(tokenizer)
        started = time.perf_counter()
        # from_tokenizer refuses slow tokenizers (ValueError): the caller fails the requests
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width, eos_token=sorted(eos_ids))
        with _LOCK:
            STATS.compile_s += time.perf_counter() - started
        self._compiled: dict[OutputFormat, Any] = {}  # pristine LLMatcher, or an error (str)
        self._executor: Any = None
        self._bytes: dict[int, bytes] = {}

    def compile(self, fmt: OutputFormat) -> str | None:
        """Compile ``fmt`` unless cached; None when it compiled, else the error."""
        import llguidance

        cached = self._compiled.get(fmt)
        if cached is not None:
            with _LOCK:
                STATS.cache_hits += 1
            return cached if isinstance(cached, str) else None
        started = time.perf_counter()
        try:
            matcher = llguidance.LLMatcher(self.lltok, grammar_text(fmt), log_level=0)
            result: Any = matcher
            if matcher.is_error():
                result = _first_line(matcher.get_error())
        except ValueError as exc:
            result = _first_line(str(exc))
        with _LOCK:
            STATS.compile_s += time.perf_counter() - started
            STATS.compiled += 1
            STATS.failed += isinstance(result, str)
        self._compiled[fmt] = result
        return result if isinstance(result, str) else None

    def matcher(self, fmt: OutputFormat) -> RowGrammar:
        """A fresh matcher for one row (``fmt`` compiled by ``compile`` before)."""
        pristine = self._compiled[fmt]
        assert not isinstance(pristine, str), "matcher() of a format that failed to compile"
        return RowGrammar(pristine.deep_copy())

    def accepts(self, fmt: OutputFormat, text: str) -> bool:
        """Whether ``text`` is a complete answer under ``fmt`` (checked from scratch)."""
        pristine = self._compiled[fmt]
        if isinstance(pristine, str):
            return False
        fresh = pristine.deep_copy()
        return bool(fresh.consume_tokens(self.lltok.tokenize_str(text)) and fresh.is_accepting())

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes of one token (byte-level BPE: raw bytes, a partial UTF-8
        character included); a special token's own text; b"" past the vocabulary."""
        out = self._bytes.get(token)
        if out is None:
            out = bytes(self.lltok.decode_bytes([token])) if token < self._vocab else b""
            self._bytes[token] = out
        return out

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[RowGrammar]) -> None:
        """Set the logits of ``rows`` (of ``logits`` [B, V], in place) that their matchers do
        not allow to -inf. Only those rows are computed and touched."""
        import llguidance
        import llguidance.torch as lt

        started = time.perf_counter()
        words = (self.width + 31) // 32
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)
        if len(rows) == 1:
            lt.fill_next_token_bitmask(matchers[0].matcher, bitmask, 0)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            lt.fill_next_token_bitmask_par(
                self._executor, [(m.matcher, i) for i, m in enumerate(matchers)], bitmask
            )
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
        index = torch.tensor(list(rows), device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, -float("inf"))
        spent = time.perf_counter() - started  # the host's share (a GPU's kernels run on)
        with _LOCK:
            STATS.masked_rows += len(rows)
            STATS.step_s += spent


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """[k, W] int32 words -> [k, width] bool (bit j of word w is token 32w + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [k, W, 32]
    out = bits.reshape(bitmask.shape[0], -1)[:, :width].bool()
    if out.shape[-1] < width:  # a mask narrower than the logits: the rest is not allowed
        out = torch.nn.functional.pad(out, (0, width - out.shape[-1]), value=False)
    return out


class RowGrammar:
    """One row's matcher."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def consume(self, token: int) -> str | None:
        """Advance by the chosen token; the error when the grammar refuses it."""
        started = time.perf_counter()
        ok = self.matcher.consume_token(token)
        spent = time.perf_counter() - started
        with _LOCK:
            STATS.step_s += spent
        if ok:
            return None
        return _first_line(self.matcher.get_error()) or f"token {token} is not allowed here"

    @property
    def stopped(self) -> bool:
        """Nothing more is allowed (the answer is complete)."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


# (tokenizer) -> {(width, eos ids): Grammars}, for the life of the tokenizer
_BY_TOKENIZER: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Grammars]] = (
    weakref.WeakKeyDictionary()
)


def grammars_for(tokenizer: Any, width: int, eos_ids: Collection[int]) -> Grammars:
    """The worker's Grammars of this tokenizer (built on first use, then reused)."""
    key = (width, tuple(sorted(eos_ids)))
    with _LOCK:
        per = _BY_TOKENIZER.setdefault(tokenizer, {})
        found = per.get(key)
    if found is not None:
        return found
    made = Grammars(tokenizer, width, eos_ids)
    with _LOCK:
        return per.setdefault(key, made)


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""
