"""Text normalization and the content hash used for exact deduplication."""
from __future__ import annotations

import hashlib
import re
import unicodedata

_WS = re.compile(r"[ \t\r\f\v]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, no control characters, runs of spaces collapsed, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    text = _WS.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def content_hash(text: str) -> str:
    """Hash of the case- and whitespace-folded text: two documents that differ only there are
    exact duplicates."""
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.blake2b(folded.encode(), digest_size=16).hexdigest()


def length_ok(text: str, min_chars: int, max_chars: int) -> str | None:
    """None if within bounds, else the reason."""
    if len(text) < min_chars:
        return f"too short ({len(text)} < {min_chars} chars)"
    if len(text) > max_chars:
        return f"too long ({len(text)} > {max_chars} chars)"
    return None

