"""Pluggable record filters for the cleaning step (`filters:` in a data config).

A filter is named "module:function" (an importable module) or "path/to/file.py:function", and
is called as `function(text, record)` on every record that passed the length bounds, where
`text` is the normalized content and `record` the mapped fields. It returns None or True to
keep the record, or False or a string (the reason) to reject it. Rejected records go to the
quarantine output with "filter <name>: <reason>", so they are counted and never silently lost.

Two heuristics from the Gopher quality rules (Rae et al., 2021) are bundled as examples.
"""
from __future__ import annotations

from collections.abc import Callable

from rayllm.hooks import HookError, load_hook

Filter = Callable[[str, dict], "bool | str | None"]


class FilterError(HookError):
    """A filter that cannot be loaded; the message names it."""


def load_filter(spec: str) -> Filter:
    return load_hook(spec, "filter", FilterError)


def apply_filters(specs: list[str], text: str, record: dict) -> str | None:
    """The rejection reason of the first filter that rejects the record, else None."""
    for spec in specs:
        try:
            verdict = load_filter(spec)(text, record)
        except Exception as e:  # noqa: BLE001 - a filter bug quarantines the record, not the job
            return f"filter {spec} raised {type(e).__name__}: {e}"
        if verdict is None or verdict is True:
            continue
        reason = verdict if isinstance(verdict, str) else "rejected"
        return f"filter {spec}: {reason}"
    return None


def alpha_words(text: str, record: dict, min_share: float = 0.8) -> str | None:
    """Gopher: at least 80% of words contain an alphabetic character."""
    words = text.split()
    share = sum(any(c.isalpha() for c in w) for w in words) / max(1, len(words))
    return None if share >= min_share else f"{share:.0%} of words alphabetic (< {min_share:.0%})"


def repeated_lines(text: str, record: dict, max_share: float = 0.3) -> str | None:
    """Gopher: at most 30% of (non-empty) lines are duplicates of another line."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    share = 1 - len(set(lines)) / max(1, len(lines))
    return None if share <= max_share else f"{share:.0%} of lines repeated (> {max_share:.0%})"
