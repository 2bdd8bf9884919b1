"""Hide secrets in what rayllm shows (the run report): `redact(obj)` returns a copy of a JSON-like
value with "***" in place of

- the value of a key whose name looks secret: a name with a part `token`, `secret`, `password`
  (`passwd`, `pwd`), `apikey`, `authorization`, `credential(s)`, or ending in `key` after
  another part (`api_key`, `AWS_SECRET_ACCESS_KEY`, `privateKey`), any case. Only strings and
  containers are hidden: a number under such a key (`eos_token_id`) is not a secret;
- inside any string: the value of every environment variable whose name looks secret
  (WANDB_API_KEY, HF_TOKEN, RAY_AUTH_TOKEN...; values of 6 characters or more), bearer/basic
  credentials, `name=value` / `name: value` pairs with a secret-looking name, the password in a
  URL (`https://user:***@host`), well-known token formats (Hugging Face, GitHub, OpenAI-style,
  Slack, AWS access key ids, JWTs), hex strings of 40+ digits (a W&B key is 40) and other long
  high-entropy words.

It is a best effort (docs/report.md): a secret that looks like ordinary text under an ordinary
name is not found.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter

MASK = "***"

_SECRET_PARTS = {"token", "secret", "secrets", "password", "passwd", "pwd", "apikey", "authorization",
                 "credential", "credentials", "passphrase"}


def _parts(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # camelCase -> camel_Case
    return [p for p in re.split(r"[^A-Za-z0-9]+", name.lower()) if p]


def is_secret_name(name: str) -> bool:
    """True for names like api_key, HF_TOKEN, db-password, Authorization, clientSecret."""
    parts = _parts(str(name))
    if not parts:
        return False
    if any(p in _SECRET_PARTS for p in parts):
        return True
    return len(parts) > 1 and parts[-1] == "key"


def _secret_env_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and isinstance(v, str) and len(v.strip()) >= 6}
    return sorted(vals, key=len, reverse=True)  # longest first: one value inside another is still hidden


_NAME = r"[A-Za-z0-9_.-]*(?:token|secret|password|passwd|pwd|api[_-]?key|apikey|access[_-]?key|private[_-]?key|" \
        r"secret[_-]?key|authorization|credentials?)"
_PATTERNS = [
    # Authorization headers: "Bearer <token>", "Basic <base64>"
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9\-._~+/]{6,}=*"), r"\1\2" + MASK),
    # name=value, name: value, "name": "value" with a secret-looking name
    (re.compile(r"(?i)\b(" + _NAME + r")(\"?'?\s*[:=]\s*\"?'?)(?!\*\*\*|(?:bearer|basic)\s)([^\s\"'&,;)}\]]+)"),
     r"\1\2" + MASK),
    # credentials in a URL: scheme://user:password@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1" + MASK + "@"),
    # well-known token formats
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), MASK),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"), MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), MASK),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), MASK),
    # long hex: API keys such as W&B's (40 digits); digests of 40+ digits (git, sha256) go too,
    # Ray's 32-digit actor ids in error messages stay
    (re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{40,}(?![A-Za-z0-9])"), MASK),
]
_WORD = re.compile(r"[A-Za-z0-9+=_-]{32,}")


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _high_entropy(word: str) -> bool:
    """A random-looking word: 32+ characters mixing upper case, lower case and digits, with
    >= 4.2 bits of entropy per character (identifiers and paths have less)."""
    return (any(c.isdigit() for c in word) and any(c.islower() for c in word) and any(c.isupper() for c in word)
            and _entropy(word) >= 4.2)


def redact_text(s: str, env_values: list[str] | None = None) -> str:
    for v in _secret_env_values() if env_values is None else env_values:
        s = s.replace(v, MASK)
    for pat, repl in _PATTERNS:
        s = pat.sub(repl, s)
    return _WORD.sub(lambda m: MASK if _high_entropy(m.group()) else m.group(), s)


def redact(obj, *, environ=None):
    """A copy of `obj` (dicts, lists, tuples, strings, scalars) with secrets replaced by "***"."""
    env_values = _secret_env_values(environ)

    def walk(o, key=None):
        if key is not None and is_secret_name(key) and isinstance(o, (str, dict, list, tuple)) and o:
            return MASK
        if isinstance(o, str):
            return redact_text(o, env_values)
        if isinstance(o, dict):
            return {k: walk(v, str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    return walk(obj)
