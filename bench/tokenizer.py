"""Byte-level BPE tokenizers trained here, with no files: the benchmark's and the tests'.

Two callers, two vocabularies, one trainer (``train_bpe``) and one wrapper (``as_fast``):

- ``build_trained_tokenizer``: the benchmark's random models. 2,048 ids trained on
  word-salad English (``WORDS``, which the workloads also write prompts from); the chat
  role markers are special tokens; no post-processor, so ``add_special_tokens`` adds
  nothing; a ChatML-like template without a BOS.
- ``build_tokenizer(arch=...)``: the tests' tiny models. ~500 ids trained on ``CORPUS`` (a
  few dozen English and German lines); special tokens and post-processor as the real
  architecture has them (llama prepends ``<s>``, t5 appends ``</s>``, gpt2 has only
  ``<|endoftext|>``); llama gets a chat template that opens with the BOS.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from tokenizers.processors import PostProcessor
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# --- the benchmark's tokenizer ------------------------------------------------------------

TOKENIZERS = ("trained", "smollm2")
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

# --- the tests' tiny tokenizers ---------------------------------------------------------

VOCAB_SIZE = 512
MAX_POSITIONS = 512  # the tiny models' context, and their tokenizers' model_max_length

# A few dozen lines of English and German, enough for a byte-level BPE of ~500 tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Please translate this sentence into German.",
    "Bitte übersetze diesen Satz ins Deutsche.",
    "What is the capital of France? The capital of France is Paris.",
    "Was ist die Hauptstadt von Frankreich? Die Hauptstadt ist Paris.",
    "A batch processor runs many prompts through a language model.",
    "Ein Stapelverarbeiter schickt viele Eingaben durch ein Sprachmodell.",
    "Summarize the following text in one sentence.",
    "Fasse den folgenden Text in einem Satz zusammen.",
    "The weather is nice today, and the sun is shining.",
    "Das Wetter ist heute schön, und die Sonne scheint.",
    "Workers pull jobs from the queue and write results to the database.",
    "Die Arbeiter holen Aufträge aus der Warteschlange.",
    "Every answer lands as a row in a table that analysts can query.",
    "Jede Antwort landet als Zeile in einer Tabelle.",
    "Once upon a time there was a little robot who liked to count numbers.",
    "Es war einmal ein kleiner Roboter, der gerne Zahlen zählte.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Eins, zwei, drei, vier, fünf, sechs, sieben, acht, neun, zehn.",
    "Question: how many legs does a spider have? Answer: eight.",
    "Frage: Wie viele Beine hat eine Spinne? Antwort: acht.",
    "The model reads the prompt, then writes one token at a time.",
    "Das Modell liest die Eingabe und schreibt dann ein Token nach dem anderen.",
    "Good morning! How are you? I am fine, thank you.",
    "Guten Morgen! Wie geht es dir? Mir geht es gut, danke.",
    "system user assistant: you are a helpful assistant.",
    "Short answers are better than long ones when the question is simple.",
    "Kurze Antworten sind besser als lange, wenn die Frage einfach ist.",
    "Numbers like 42, 2024 and 3.14 appear in many texts.",
    "Red, green and blue are colors; rot, grün und blau sind Farben.",
    "The train leaves at nine o'clock from platform four.",
    "Der Zug fährt um neun Uhr von Gleis vier ab.",
    "Stop here. END. Ende. ### stop ###",
]

# The benchmark's template, opened by "<s>" as a BOS token would open the conversation.
TINY_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE

# pad, eos, bos, unk: the ids 0, 1, 2, 3 (specials take the first ids, in this order)
LLAMA_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
GPT2_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}  # no pad, as GPT-2


def corpus_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic word-salad sentences: enough text to train a BPE and build prompts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    return out


def train_bpe(corpus: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str]) -> Tokenizer:
    """A byte-level BPE trained on ``corpus``; ``special_tokens`` take ids 0, 1, ... in order.

    Training is deterministic for a fixed corpus: the same call gives the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def as_fast(
    tok: Tokenizer, specials: dict[str, str], *, context: int, chat_template: str | None
) -> PreTrainedTokenizerFast:
    """``tok`` as a transformers tokenizer with these special-token roles."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.model_max_length = context
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_trained_tokenizer(vocab_size: int = TRAINED_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE (``<pad>`` 0, ``</s>`` 1 = EOS, ``<s>`` 2) with a chat template."""
    specials = [*LLAMA_SPECIALS.values(), "<|system|>", "<|user|>", "<|assistant|>"]
    tok = train_bpe(corpus_sentences(2000), vocab_size=vocab_size, special_tokens=specials)
    return as_fast(tok, LLAMA_SPECIALS, context=CONTEXT, chat_template=CHAT_TEMPLATE)


def load_tokenizer(kind: str, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The benchmark's tokenizer ``kind``: ``trained`` here, or SmolLM2's from its folder."""
    if kind == "trained":
        return build_trained_tokenizer()
    if kind == "smollm2":
        from transformers import AutoTokenizer

        from lmjobs.worker.models import ensure_smollm2

        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(ensure_smollm2(Path(cache_dir)))
        return loaded
    raise ValueError(f"unknown tokenizer {kind!r} (use one of {TOKENIZERS})")


def build_tokenizer(*, arch: str, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``CORPUS``; special tokens per architecture.

    ids: ``<pad>`` 0, ``</s>`` 1, ``<s>`` 2, ``<unk>`` 3 (llama and t5);
    gpt2 has only ``<|endoftext|>`` 0 (bos = eos, no pad token, as the real GPT-2).
    """
    from tokenizers import processors

    del seed  # BPE training is deterministic for a fixed corpus
    specials = GPT2_SPECIALS if arch == "gpt2" else LLAMA_SPECIALS
    tok = train_bpe(CORPUS, vocab_size=VOCAB_SIZE, special_tokens=_unique(specials.values()))
    post: PostProcessor
    if arch == "llama":
        bos = tok.token_to_id("<s>")
        post = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    elif arch == "t5":
        eos = tok.token_to_id("</s>")
        post = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
    else:
        post = processors.ByteLevel(trim_offsets=False)
    tok.post_processor = post
    template = TINY_CHAT_TEMPLATE if arch == "llama" else None
    return as_fast(tok, specials, context=MAX_POSITIONS, chat_template=template)


def _unique(tokens: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(tokens))
