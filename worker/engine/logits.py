"""What happens to a row's logits before its next token is chosen.

1. The model's own generation config (``generation_config.json``), applied as
   ``model.generate`` applies it (DESIGN.md item 8), with transformers' own
   ``LogitsProcessor`` classes, in ``generate``'s order. Each row gets its own processors,
   built when it starts for its own prompt (its length, its ids) and called with the ids
   ``generate`` would pass for that prompt alone: the prompt and the tokens written so far
   for a decoder-only model, the decoder start token and the tokens written so far for an
   encoder-decoder. Rows join and leave a continuous batch, and the batch's left padding
   never reaches a processor, so a row's tokens do not depend on its neighbours. The cost is
   a small call per row and step, paid only when the checkpoint sets such a rule or the
   request asks for an adjustment.
2. The request's own adjustments, OpenAI's meaning: ``logit_bias`` added to the logits, then
   ``frequency_penalty`` x (times the token was generated so far) and ``presence_penalty`` x
   (whether it was) subtracted, over the generated tokens only. They come after the
   checkpoint's rules, so a token the checkpoint bans stays banned.

Settings of a generation config, by what lmjobs does with them:

- ``HONOURED``: the logits rules above.
- ``JOB_DECIDES``: how to search and how long to write. Each job's explicit parameters
  decide (greedy unless the job asks for temperature/top_p/top_k/seed, its own
  max_new_tokens): a checkpoint's ``do_sample=True, temperature=0.6`` does not make a
  greedy job sample, and lmjobs has no beam search (``num_beams`` and its companions). They
  are logged at load, never refused.
- ``SPECIAL_TOKENS``: EOS ends a row (with the tokenizer's EOS), pad and decoder start
  tokens feed the batches.
- ``NO_EFFECT``: caching, compilation, speculative decoding, output formats: how
  ``generate`` computes, not which tokens it writes.
- Anything else a checkpoint sets to a non-neutral value (classifier-free guidance,
  watermarking, token healing, stop strings, constrained beam search, removing invalid
  values, and every field a later transformers release adds) refuses the model at load
  with a ModelLoadError naming the setting. Keys that are not GenerationConfig fields at all
  are ignored, as ``generate`` ignores them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmjobs.jobs.engine_api import SamplingParams
from lmjobs.jobs.errors import ModelLoadError
from lmjobs.worker.engine import compat

logger = logging.getLogger(__name__)

HONOURED = frozenset(
    {
        "sequence_bias",
        "encoder_repetition_penalty",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "min_length",
        "min_new_tokens",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "renormalize_logits",
    }
)
JOB_DECIDES = frozenset(
    {
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "top_h",
        "min_p",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "length_penalty",
        "early_stopping",
        "penalty_alpha",
        "dola_layers",
        "max_length",
        "max_new_tokens",
        "max_time",
        "num_return_sequences",
    }
)
SPECIAL_TOKENS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"})
NO_EFFECT = frozenset(
    {
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "prefill_chunk_size",
        "low_memory",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "transformers_version",
        "is_assistant",
        "assistant_confidence_threshold",
        "assistant_early_exit",
        "assistant_ensemble_weight",
        "assistant_lookbehind",
        "target_lookbehind",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "max_matching_ngram_size",
        "prompt_lookup_num_tokens",
        "speculation_type",
        "use_mtp",
        "generation_kwargs",
    }
)
# values that leave generate's output as it is without the setting
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "guidance_scale": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "min_length": (0,),
    "min_new_tokens": (0,),
}

# OpenAI's ranges for the per-request fields
LOGIT_BIAS_RANGE = (-100.0, 100.0)
PENALTY_RANGE = (-2.0, 2.0)


def _is_set(name: str, value: Any, default: Any) -> bool:
    if value is None or value is False or (isinstance(value, (list, tuple, dict)) and not value):
        return False
    if value in _NEUTRAL.get(name, ()):
        return False
    return bool(value != default)


def generation_settings(config: Any) -> dict[str, Any]:
    """The GenerationConfig fields ``config`` sets to something other than this release's
    default or a neutral value; private fields and non-fields left out."""
    defaults = compat.GenerationConfig() if compat.GenerationConfig is not None else None
    known = vars(defaults) if defaults is not None else {}
    out: dict[str, Any] = {}
    for name, value in vars(config).items():
        if name.startswith("_") or name not in known:
            continue
        if _is_set(name, value, known[name]):
            out[name] = value
    return out


def check_generation_config(config: Any) -> list[str]:
    """Raise ModelLoadError naming every setting of ``config`` lmjobs cannot honour; return
    the search and length settings the jobs decide instead (to log)."""
    settings = generation_settings(config)
    refused = sorted(n for n in settings if n not in HONOURED | JOB_DECIDES | SPECIAL_TOKENS | NO_EFFECT)
    if refused:
        shown = ", ".join(f"{n}={settings[n]!r}" for n in refused)
        raise ModelLoadError(
            f"the model's generation_config sets {shown}, which lmjobs' engine does not implement "
            f"(model.generate would apply it; lmjobs refuses rather than ignore it)"
        )
    return sorted(n for n in settings if n in JOB_DECIDES)


@dataclass(frozen=True)
class GenerationRules:
    """The model's generation config, checked, and what each row needs from it."""

    config: Any  # the model's GenerationConfig
    eos_ids: tuple[int, ...]  # every token that ends a row (generate's and the tokenizer's)
    is_seq2seq: bool
    active: bool  # whether any logits rule applies

    @classmethod
    def from_model(cls, config: Any, eos_ids: Iterable[int], *, is_seq2seq: bool) -> GenerationRules:
        check_generation_config(config)
        active = any(name in HONOURED for name in generation_settings(config))
        return cls(config, tuple(sorted(eos_ids)), is_seq2seq, active)

    def row(
        self, prompt: Sequence[int], params: SamplingParams, device: torch.device, decoder_start: int
    ) -> RowLogits | None:
        """What one row (``prompt``, ``params``) does to its logits; None when nothing."""
        adjusts = bool(params.logit_bias or params.presence_penalty or params.frequency_penalty)
        if not self.active and not adjusts:
            return None
        # the ids generate sees before the generated ones: its ``input_ids`` for this prompt
        prefix = (decoder_start,) if self.is_seq2seq else tuple(prompt)
        processors = (
            self._processors(prompt, len(prefix), params.max_new_tokens, device) if self.active else None
        )
        return RowLogits(prefix, processors, params, device)

    def _processors(
        self, prompt: Sequence[int], start: int, max_new_tokens: int, device: torch.device
    ) -> Any:
        """generate's ``_get_logits_processor`` for one prompt (same classes, same order);
        ``start`` is its ``input_ids_seq_length``."""
        c, make = self.config, compat.make_processor
        eos = torch.tensor(self.eos_ids, device=device) if self.eos_ids else None
        encoder_ids = torch.tensor([list(prompt)], device=device)  # [1, S]
        out = compat.LogitsProcessorList()
        if c.sequence_bias is not None:
            out.append(compat.SequenceBiasLogitsProcessor(sequence_bias=c.sequence_bias))
        if c.encoder_repetition_penalty not in (None, 1.0):
            out.append(
                compat.EncoderRepetitionPenaltyLogitsProcessor(
                    penalty=float(c.encoder_repetition_penalty), encoder_input_ids=encoder_ids
                )
            )
        if c.repetition_penalty not in (None, 1.0):
            out.append(compat.RepetitionPenaltyLogitsProcessor(float(c.repetition_penalty)))
        if c.no_repeat_ngram_size:
            out.append(compat.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
        if c.encoder_no_repeat_ngram_size:
            out.append(
                compat.EncoderNoRepeatNGramLogitsProcessor(c.encoder_no_repeat_ngram_size, encoder_ids)
            )
        if c.bad_words_ids is not None:
            out.append(compat.NoBadWordsLogitsProcessor(c.bad_words_ids, eos))
        if c.min_length and eos is not None:
            out.append(make(compat.MinLengthLogitsProcessor, c.min_length, eos, device=device))
        if c.min_new_tokens and eos is not None:
            out.append(
                make(compat.MinNewTokensLengthLogitsProcessor, start, c.min_new_tokens, eos, device=device)
            )
        if c.forced_bos_token_id is not None:
            out.append(compat.ForcedBOSTokenLogitsProcessor(c.forced_bos_token_id))
        if c.forced_eos_token_id is not None:
            # generate's max_length for this prompt: its input ids plus max_new_tokens
            out.append(
                make(
                    compat.ForcedEOSTokenLogitsProcessor,
                    start + max_new_tokens,
                    c.forced_eos_token_id,
                    device=device,
                )
            )
        if c.exponential_decay_length_penalty is not None:
            out.append(compat.ExponentialDecayLengthPenalty(c.exponential_decay_length_penalty, eos, start))
        if c.suppress_tokens is not None:
            out.append(make(compat.SuppressTokensLogitsProcessor, c.suppress_tokens, device=device))
        if c.begin_suppress_tokens is not None:
            # as generate: one later when a forced BOS takes the first position
            begin = start if (start > 1 or c.forced_bos_token_id is None) else start + 1
            out.append(
                make(
                    compat.SuppressTokensAtBeginLogitsProcessor, c.begin_suppress_tokens, begin, device=device
                )
            )
        if c.renormalize_logits is True:
            out.append(compat.LogitNormalization())
        return out


class RowLogits:
    """One row's logits rules: the checkpoint's processors and the request's adjustments."""

    def __init__(
        self, prefix: tuple[int, ...], processors: Any, params: SamplingParams, device: torch.device
    ) -> None:
        self.prefix = list(prefix)
        self.processors = processors  # a LogitsProcessorList, or None
        self.presence = float(params.presence_penalty)
        self.frequency = float(params.frequency_penalty)
        self.bias_ids: torch.Tensor | None = None  # [k]
        self.bias: torch.Tensor | None = None  # [k]
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            self.bias = torch.tensor(values, dtype=torch.float32, device=device)

    def apply(self, scores: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        """scores: [1, V] float32, this row's next-token logits; returns the adjusted ones."""
        if self.processors:
            ids = torch.tensor([self.prefix + list(generated)], dtype=torch.long, device=scores.device)
            scores = self.processors(ids, scores)
        if self.bias is not None and self.bias_ids is not None:
            scores = scores.index_add(1, self.bias_ids, self.bias[None, :].to(scores.dtype))
        if (self.presence or self.frequency) and generated:
            written = torch.tensor(list(generated), dtype=torch.long, device=scores.device)
            counts = torch.bincount(written, minlength=scores.shape[-1])[: scores.shape[-1]]  # [V]
            counts = counts.to(scores.dtype)
            scores = (
                scores - (self.frequency * counts + self.presence * (counts > 0).to(scores.dtype))[None, :]
            )
        return scores


def check_request(params: SamplingParams, vocab_size: int | None) -> str | None:
    """Why the request's adjustments cannot run (OpenAI's ranges, token ids the model has),
    or None."""
    low, high = PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not low <= value <= high:
            return f"{name} must be within {low:g}..{high:g} (got {value})"
    low, high = LOGIT_BIAS_RANGE
    for token, bias in params.logit_bias:
        if not low <= bias <= high:
            return f"logit_bias values must be within {low:g}..{high:g} (token {token}: {bias})"
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            return f"logit_bias names token {token}, which the model does not have (vocabulary {vocab_size})"
    return None


def log_job_decided(names: Sequence[str], config: Any) -> None:
    if names:
        shown = ", ".join(f"{n}={getattr(config, n)!r}" for n in names)
        logger.info(
            "generation_config sets %s: lmjobs decodes as each job asks (greedy unless it samples, "
            "one beam, its own max_new_tokens) and does not apply these",
            shown,
        )
