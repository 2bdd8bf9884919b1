"""Decontamination: drop training documents that share a long word n-gram with any evaluation
text, and report which evaluation text each one matched."""
from __future__ import annotations

import re

import xxhash

_WORD = re.compile(r"\w+", re.UNICODE)


def ngram_hashes(text: str, n: int) -> set[int]:
    words = _WORD.findall(text.lower())
    return {xxhash.xxh64_intdigest(" ".join(words[i:i + n]).encode()) for i in range(len(words) - n + 1)}


class EvalIndex:
    """Hashes of every n-gram of the evaluation texts (13 words by default, as GPT-3 and later
    reports use). Texts shorter than n words are indexed whole."""

    def __init__(self, eval_texts: dict[str, str], n: int = 13):
        self.n = n
        self.owner: dict[int, str] = {}
        for name, text in eval_texts.items():
            grams = ngram_hashes(text, n) or ({xxhash.xxh64_intdigest(" ".join(_WORD.findall(text.lower())).encode())}
                                             if text.strip() else set())
            for h in grams:
                self.owner.setdefault(h, name)

    def match(self, text: str) -> str | None:
        """Name of an evaluation text this document overlaps, or None. A document shorter than
        n words matches only an evaluation text that is, word for word, the same."""
        grams = ngram_hashes(text, self.n)
        if not grams:
            words = _WORD.findall(text.lower())
            grams = {xxhash.xxh64_intdigest(" ".join(words).encode())} if words else set()
        for h in grams:
            if h in self.owner:
                return self.owner[h]
        return None
