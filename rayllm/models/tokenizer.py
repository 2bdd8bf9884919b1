"""A byte-level BPE tokenizer trained on text bundled with rayllm, so nothing comes from a hub.

Byte-level means every string encodes (unknown bytes fall back to single-byte tokens). The
result is saved in Hugging Face format under the cache, keyed by the hash of its inputs.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from rayllm.env import cache_dir
from rayllm.io import atomic_dir

SPECIAL = ["<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Single- and multi-turn chats. Each turn ends in <|end|>, which is also the EOS token, so a
# model trained on this template stops after its answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def bundled_corpus() -> list[str]:
    """The package's own text plus the bundled tasks, so their numbers and words tokenize well."""
    from rayllm.datasets.tasks import arithmetic

    root = resources.files("rayllm.models") / "corpus"
    texts = [p.read_text() for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt")]
    texts += [f"{r['prompt']} {r['response']}" for r in arithmetic(4000, seed=12345)]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token="<|endoftext|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def bundled_tokenizer_path(vocab_size: int = 2048) -> Path:
    """Train (once) and return the directory of the bundled tokenizer."""
    texts = bundled_corpus()
    h = hashlib.sha256(json.dumps([texts, vocab_size, SPECIAL, CHAT_TEMPLATE]).encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{h}"
    if not (path / "tokenizer.json").is_file():
        with atomic_dir(path) as tmp:
            train_tokenizer(texts, vocab_size).save_pretrained(tmp)
    return path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
