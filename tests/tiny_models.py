"""Tiny random language models built offline, for tests.

Each builder writes a model folder (config, safetensors weights, tokenizer) that
``from_pretrained`` and ``lmjobs.worker.models.load_model`` read like any Hugging Face
checkpoint, and returns its path. Everything is seeded: the same call gives the same files.

The models are random, so their text is noise, but it is deterministic noise: greedy
decoding gives real multi-token outputs (the EOS row of the output layer is zeroed, so its
logit sits at 0 while the best of the other ~500 is well above: generation runs to
``max_new_tokens``; tests that need an EOS declare a token the model does write as one),
and weights are drawn with a standard deviation large enough
that logits are well separated (no near ties that float rounding could flip) and small
enough that nothing underflows into denormals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)

VOCAB_SIZE = 512
MAX_POSITIONS = 512
INIT_STD = 0.08

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

# ChatML-like, small enough to read; "<s>" opens the conversation like a BOS token would.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(*, arch: str, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``CORPUS``; special tokens per architecture.

    ids: ``<pad>`` 0, ``</s>`` 1, ``<s>`` 2, ``<unk>`` 3 (llama and t5);
    gpt2 has only ``<|endoftext|>`` 0 (bos = eos, no pad token, as the real GPT-2).
    """
    del seed  # BPE training is deterministic for a fixed corpus
    specials = ["<|endoftext|>"] if arch == "gpt2" else ["<pad>", "</s>", "<s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if arch == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    elif arch == "t5":
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    if arch == "gpt2":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            eos_token="</s>",
            bos_token="<s>",
            unk_token="<unk>",
        )
    fast.model_max_length = MAX_POSITIONS
    if arch == "llama":
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _init_weights(model: PreTrainedModel, *, eos_id: int, seed: int) -> None:
    """Redraw every weight from a seeded normal; norms stay at 1, biases at 0.

    The output row of EOS is zeroed (its logit stays 0), so greedy decoding does not stop
    at once (for T5, whose output layer is tied, the EOS input embedding is zero too).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * INIT_STD)
            elif "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                param.fill_(1.0)
            elif "ln_f" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        model.get_output_embeddings().weight[eos_id] = 0.0
    model.eval()


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build_tiny_causal(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random causal LM (``arch`` "llama" or "gpt2") to ``path``; return it."""
    path = Path(path)
    tok = build_tokenizer(arch=arch, seed=seed)
    config: PretrainedConfig
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=MAX_POSITIONS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"unknown causal arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, eos_id=tok.eos_token_id, seed=seed)
    return _save(model, tok, path)


def build_tiny_seq2seq(path: str | Path, arch: str = "t5", seed: int = 0) -> Path:
    """Write a tiny random encoder-decoder (T5) to ``path``; return it."""
    if arch != "t5":
        raise ValueError(f"unknown seq2seq arch {arch!r}")
    path = Path(path)
    tok = build_tokenizer(arch=arch, seed=seed)
    # T5 ties its output layer to the input embeddings whatever the config says (in 5.x);
    # n_positions is not a T5Config argument but is read back as the context length.
    t5_args: dict[str, Any] = dict(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        n_positions=MAX_POSITIONS,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    config = T5Config(**t5_args)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    _init_weights(model, eos_id=tok.eos_token_id, seed=seed)
    return _save(model, tok, path)
