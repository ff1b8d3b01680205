"""Benchmark arms for the engine's request features (lmjobs issue 11):

- ``constrained``: the same prompts generated free and under a JSON-schema output format
  (greedy, ``ignore_eos`` off so each answer ends where its grammar completes), output
  tokens/s side by side; grammar compile time measured apart (``grammar.STATS``), after a
  warm-up that builds the tokenizer's token table.
- ``samples``: one request with ``n=4`` against four separate requests of the same prompt
  (sampled, fixed seeds, ``ignore_eos``): wall time, prefill forward passes and prompt
  tokens prefilled, counted by wrapping the model's forward. The four requests run with
  prefix reuse off (else they would share all but their prompt's last token): the arm
  compares sharing one prefill with none.

Run: ``python -m lmjobs.bench.features --model smollm2-135m`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmjobs.bench.measure import cached_columns
from lmjobs.bench.workloads import TextMaker
from lmjobs.jobs.engine_api import Generation, GenRequest, OutputFormat, SamplingParams
from lmjobs.worker.engine import grammar
from lmjobs.worker.engine.core import EngineConfig, generate

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "good": {"type": "boolean"},
    },
    "required": ["title", "year", "tags", "good"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = OutputFormat("json_schema", json.dumps(SCHEMA, sort_keys=True, separators=(",", ":")))


@dataclass
class Prefills:
    """Multi-token forward passes (prefills) seen, and their prompt tokens (real, unpadded)."""

    calls: int = 0
    tokens: int = 0
    seconds: float = 0.0


@contextmanager
def count_prefills(model: Any) -> Iterator[Prefills]:
    """Count the prefill forwards of ``model`` (causal: more than one input column, or a
    forward asking for the last logits only, as the engine's prefills do: a suffix prefilled
    after a shared prefix may be one column wide) and their real new tokens (the mask's
    columns after those already cached: a suffix's mask starts with its cached prefix)."""
    seen = Prefills()
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None or (ids.shape[1] == 1 and "logits_to_keep" not in kwargs):
            return original(*args, **kwargs)
        past = cached_columns(kwargs)  # before the forward
        started = time.perf_counter()
        out = original(*args, **kwargs)
        seen.seconds += time.perf_counter() - started
        seen.calls += 1
        mask = kwargs.get("attention_mask")
        seen.tokens += (
            int(mask[:, past : past + ids.shape[1]].sum()) if mask is not None else int(ids.numel())
        )
        return out

    model.forward = forward
    try:
        yield seen
    finally:
        del model.forward  # back to the class's forward


@dataclass
class ArmFigures:
    name: str
    output_tokens: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.name,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            **self.extra,
        }


def _timed(run: Callable[[], list[Generation]]) -> tuple[list[Generation], float]:
    started = time.perf_counter()
    out = run()
    return out, time.perf_counter() - started


def constrained_arms(
    model: Any, tokenizer: Any, prompts: Sequence[str], new_tokens: int, config: EngineConfig
) -> list[ArmFigures]:
    """Free and JSON-schema generation of the same prompts (greedy), and free generation
    forced to the constrained answers' lengths (``ignore_eos``): the same batch shapes
    step by step, so the difference is the grammar's own cost."""

    def requests(fmt: OutputFormat | None, lengths: Sequence[int] = ()) -> list[GenRequest]:
        return [
            GenRequest(
                key=i,
                prompt=p,
                params=SamplingParams(
                    max_new_tokens=lengths[i] if lengths else new_tokens,
                    output_format=fmt,
                    ignore_eos=bool(lengths),
                ),
            )
            for i, p in enumerate(prompts)
        ]

    before = grammar.STATS.snapshot()
    started = time.perf_counter()
    generate(model, tokenizer, requests(SCHEMA_FORMAT)[:1], config)  # token table + compile
    warm_s = time.perf_counter() - started
    compile_s = grammar.STATS.compile_s - before.compile_s
    free, free_s = _timed(lambda: generate(model, tokenizer, requests(None), config))
    timed = grammar.STATS.snapshot()
    bound, bound_s = _timed(lambda: generate(model, tokenizer, requests(SCHEMA_FORMAT), config))
    step_s = grammar.STATS.step_s - timed.step_s
    lengths = [g.output_tokens for g in bound]
    same, same_s = _timed(lambda: generate(model, tokenizer, requests(None, lengths), config))
    valid = sum(1 for g in bound if g.valid)
    return [
        ArmFigures("unconstrained", sum(g.output_tokens for g in free), free_s),
        ArmFigures("unconstrained, same lengths", sum(g.output_tokens for g in same), same_s),
        ArmFigures(
            "json_schema",
            sum(g.output_tokens for g in bound),
            bound_s,
            {
                "valid": f"{valid}/{len(bound)}",
                "compile_s": round(compile_s, 4),
                "first_call_s": round(warm_s, 3),
                "compiled_in_timed_run": grammar.STATS.compiled - before.compiled - 1,
                "grammar_step_s": round(step_s, 4),  # masks and matchers, inside ``seconds``
                "masked_rows": grammar.STATS.masked_rows - timed.masked_rows,
            },
        ),
    ]


def samples_arms(
    model: Any, tokenizer: Any, prompt: str, new_tokens: int, config: EngineConfig
) -> list[ArmFigures]:
    """``n=4`` against four separate requests of the same prompt (sampled, seeds 0..3)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    one = [GenRequest(key=0, prompt=prompt, params=SamplingParams(**{**_fields(params), "n": 4}))]
    four = [
        GenRequest(key=i, prompt=prompt, params=SamplingParams(**{**_fields(params), "seed": i}))
        for i in range(4)
    ]
    out: list[ArmFigures] = []
    alone = replace(config, prefix_reuse=False)
    for name, reqs, how in (("n=4", one, config), ("4 requests", four, alone)):
        with count_prefills(model) as seen:
            started = time.perf_counter()
            gens = generate(model, tokenizer, reqs, how)
            seconds = time.perf_counter() - started
        out.append(
            ArmFigures(
                name,
                sum(g.output_tokens for g in gens),
                seconds,
                {
                    "prefill_calls": seen.calls,
                    "prefill_tokens": seen.tokens,
                    "prefill_s": round(seen.seconds, 4),
                    "texts": [g.text for g in gens],
                },
            )
        )
    return out


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def run(
    model: Any,
    tokenizer: Any,
    *,
    requests: int,
    prompt_tokens: int,
    new_tokens: int,
    config: EngineConfig,
    seed: int = 0,
) -> dict[str, Any]:
    maker = TextMaker(tokenizer, seed)
    prompts = [
        "Describe this as a JSON record: " + maker.exact(prompt_tokens, add_special=True)
        for _ in range(requests)
    ]
    constrained = constrained_arms(model, tokenizer, prompts, new_tokens, config)
    samples = samples_arms(model, tokenizer, prompts[0], new_tokens, config)
    free, same_lengths, bound = constrained
    n4, sep = samples
    # sample i of n=4 is seeded seed + i: the same draws as the four requests seeded 0..3
    same = n4.extra.pop("texts") == sep.extra.pop("texts")
    return {
        "constrained": [a.to_dict() for a in constrained],
        # share of output tokens/s lost to the grammar, against free text of the same lengths
        "constrained_cost": round(1 - bound.tokens_per_s / same_lengths.tokens_per_s, 4)
        if same_lengths.tokens_per_s
        else None,
        "constrained_cost_vs_free_lengths": round(1 - bound.tokens_per_s / free.tokens_per_s, 4)
        if free.tokens_per_s
        else None,
        "samples": [a.to_dict() for a in samples],
        "prefill_tokens_ratio": round(n4.extra["prefill_tokens"] / sep.extra["prefill_tokens"], 4)
        if sep.extra["prefill_tokens"]
        else None,
        "n4_texts_equal_separate_requests": same,
        "grammar_stats": vars(grammar.STATS.snapshot()),
    }


def table(report: dict[str, Any]) -> str:
    """The arms side by side, then the two target figures."""
    lines = [f"{'arm':<42} {'tokens':>7} {'s':>8} {'tokens/s':>9}  notes"]
    for arm in report["constrained"] + report["samples"]:
        notes = []
        if "valid" in arm:
            notes.append(f"{arm['valid']} valid")
        if "grammar_step_s" in arm:
            notes.append(
                f"grammar {arm['grammar_step_s']:.3f} s, compile {arm.get('compile_s', 0):.3f} s apart"
            )
        if "prefill_tokens" in arm:
            notes.append(
                f"{arm['prefill_calls']} prefill, {arm['prefill_tokens']} prompt tokens, "
                f"{arm['prefill_s']:.2f} s"
            )
        lines.append(
            f"{arm['arm']:<42} {arm['output_tokens']:>7} {arm['seconds']:>8.2f} {arm['tokens_per_s']:>9.1f}  "
            + "; ".join(notes)
        )
    cost = report.get("constrained_cost")
    ratio = report.get("prefill_tokens_ratio")
    lines.append(
        f"constrained cost against free text of the same lengths: "
        f"{'-' if cost is None else f'{cost:.1%}'} (target: at most 15%)"
    )
    lines.append(
        f"n=4 prefill tokens / four requests': {'-' if ratio is None else f'{ratio:.2f}'} "
        "(target: less than 4x one request's prefill)"
    )
    return "\n".join(lines)


def run_features(
    *,
    model: str = "smollm2-135m",
    cache_dir: Path,
    dtype: str = "float32",
    requests: int = 16,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    mode: str = "auto",
    threads: int = 0,
) -> dict[str, Any]:
    """Load the model and run both comparisons (what ``lmjobs bench --preset features`` runs)."""
    from lmjobs.worker.models import load_model

    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, device="cpu", dtype=dtype, cache_dir=cache_dir)
    report = run(
        lm.model,
        lm.tokenizer,
        requests=requests,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        config=EngineConfig(mode=mode),
    )
    report["settings"] = {
        "model": model,
        "dtype": dtype,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "mode": mode,
        "threads": torch.get_num_threads(),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmjobs.bench.features", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="smollm2-135m", help="model id, folder or alias")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "lmjobs" / "models"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json-out", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    report = run_features(
        model=args.model,
        cache_dir=Path(args.cache_dir),
        dtype=args.dtype,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        mode=args.mode,
        threads=args.threads,
    )
    print(table(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
