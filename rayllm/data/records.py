"""Parse raw files into records, sending every unusable line or row to quarantine with its
source, line (or row) and reason, so nothing is dropped silently.

A record is a dict with the mapped fields plus `_source` and `_line`. The record kinds:
`text` (plain text), `sft` (a chat or prompt+response), `preference` (prompt+chosen+rejected)
and `prompt` (prompts only, for PPO).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Literal

from rayllm.config import FieldMap
from rayllm.datasets.sft import json_type

Kind = Literal["text", "sft", "preference", "prompt"]


class Fields(FieldMap):
    """Which source fields hold what (FieldMap), plus the record kind and size bound."""

    kind: Kind = "text"
    max_chars: int = 1_000_000

    def required(self, record: dict) -> dict[str, str]:
        """Canonical name -> the source field that holds it, for this kind of record."""
        if self.kind == "text":
            names = ["text"]
        elif self.kind == "sft":
            names = ["messages"] if self.messages in record else ["prompt", "response"]
        elif self.kind == "preference":
            names = ["prompt", "chosen", "rejected"]
        else:
            names = ["prompt"]
        return {n: getattr(self, n) for n in names}

    def expected(self) -> str:
        """What a record of this kind must hold, for the quarantine reason of one that does not."""
        if self.kind == "sft":
            return f"field {self.messages!r} or fields {self.prompt!r} and {self.response!r}"
        return "field(s) " + ", ".join(repr(f) for f in self.required({}).values())


@dataclass
class Parsed:
    records: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)

    def quarantine(self, source: str, line: int, reason: str, raw: str = "") -> None:
        self.quarantined.append({"_source": source, "_line": line, "reason": reason, "raw": raw[:500]})


def _check(rec: dict, fields: Fields, source: str, line: int, out: Parsed, raw: str) -> None:
    if not isinstance(rec, dict):  # valid JSON, but e.g. [1, 2], 3, "x" or null
        got = json_type(rec)
        return out.quarantine(source, line, f"expected a JSON object with {fields.expected()}, got {got}", raw)
    need = fields.required(rec)
    missing = [f for f in need.values() if f not in rec or rec[f] is None]
    if missing:
        return out.quarantine(source, line, f"missing field(s) {missing}", raw)
    values = [rec[f] for f in need.values()]
    if any(isinstance(v, str) and not v.strip() for v in values) or any(v == [] for v in values):
        return out.quarantine(source, line, "empty document", raw)
    size = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in values)
    if size > fields.max_chars:
        return out.quarantine(source, line, f"over-long record ({size} > {fields.max_chars} chars)", raw)
    # Records leave under canonical names (text, prompt, response, ...): later steps need no map.
    out.records.append({**{name: rec[f] for name, f in need.items()}, "_source": source, "_line": line})


def parse_jsonl(source: str, data: bytes, fields: Fields) -> Parsed:
    out = Parsed()
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.quarantine(source, i, f"not UTF-8 ({e.reason} at byte {e.start})", raw.decode("utf-8", "replace"))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            out.quarantine(source, i, f"malformed JSON ({e.msg})", text)
            continue
        _check(rec, fields, source, i, out, text)
    return out


def parse_text(source: str, data: bytes, fields: Fields) -> Parsed:
    """A plain-text file is one document (line 1 is its start)."""
    out = Parsed()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        out.quarantine(source, 1, f"not UTF-8 ({e.reason} at byte {e.start})", data[:500].decode("utf-8", "replace"))
        return out
    _check({fields.text: text}, Fields(kind="text", text=fields.text, max_chars=fields.max_chars), source, 1, out, text)
    return out


def parse_parquet(source: str, data: bytes, fields: Fields) -> Parsed:
    import pyarrow.parquet as pq

    out = Parsed()
    table = pq.read_table(io.BytesIO(data))
    for i, rec in enumerate(table.to_pylist(), 1):
        _check(rec, fields, source, i, out, json.dumps(rec, default=str)[:500])
    return out


PARSERS = {".jsonl": parse_jsonl, ".json": parse_jsonl, ".txt": parse_text, ".md": parse_text, ".py": parse_text,
           ".parquet": parse_parquet}


def parse_file(source: str, data: bytes, fields: Fields) -> Parsed:
    suffix = "." + source.rsplit(".", 1)[-1].lower() if "." in source.rsplit("/", 1)[-1] else ""
    parser = PARSERS.get(suffix, parse_text)
    try:
        return parser(source, data, fields)
    except Exception as e:  # a wholly unreadable file (e.g. corrupt Parquet): quarantine it whole
        out = Parsed()
        out.quarantine(source, 0, f"unreadable file: {type(e).__name__}: {e}")
        return out
