"""Instruction/chat data for SFT: records -> token ids with a loss mask over response tokens.

The mask is found by rendering the chat template twice per assistant turn, with and without
that turn: the tokens the turn adds are the ones the model must learn to produce. This works
for any template whose rendering of a prefix of the conversation is a prefix of the whole
(true of the bundled template and of common chat templates).
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np

from rayllm.config import SFTDataConfig
from rayllm.datasets.tasks import bundled


class DataError(ValueError):
    """A data source or record that cannot be used; the message names it."""


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def json_type(value) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "null"), for error messages."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_jsonl(path: str, expected: str):
    """Yield ("path:line", record) for each non-blank line of a JSONL file.

    A line that is not UTF-8, not JSON, or JSON but not an object (`[1, 2]`, `3`, `"x"`, `null`)
    raises DataError naming the file, the line and what a record must be: "a JSON object with
    `expected`". Every JSONL reader goes through here, so none of them meets a non-dict record.
    The file is read as bytes so that a bad byte, too, is reported with its line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object with {expected}, got {json_type(rec)}")
            yield where, rec


def load_records(cfg: SFTDataConfig, seed: int = 0) -> list[dict]:
    if cfg.source.startswith("bundled:"):
        return bundled(cfg.source.split(":", 1)[1], cfg.num_examples, seed)
    expected = f"field {cfg.messages_field!r} or fields {cfg.prompt_field!r} and {cfg.response_field!r}"
    records = [rec for _, rec in read_jsonl(cfg.source, expected)]
    if not records:
        raise DataError(f"{cfg.source}: no records")
    return records


def to_messages(record: dict, cfg: SFTDataConfig, where: str = "record") -> list[dict]:
    if cfg.messages_field in record:
        msgs = record[cfg.messages_field]
        if not (isinstance(msgs, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)):
            raise DataError(f"{where}: {cfg.messages_field!r} must be a list of {{role, content}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: chat has no assistant turn to learn from")
        return msgs
    missing = [f for f in (cfg.prompt_field, cfg.response_field) if f not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; has {sorted(record)}")
    return [{"role": "user", "content": str(record[cfg.prompt_field])},
            {"role": "assistant", "content": str(record[cfg.response_field])}]


def tokenize_chat(tok, messages: list[dict], max_length: int) -> dict:
    """input_ids and loss_mask (1 on tokens of assistant turns), truncated to max_length."""
    def ids(msgs, gen):
        if tok.chat_template:
            return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False))
        # No template: plain "prompt response<eos>" concatenation.
        text = "".join(m["content"] + ("" if m["role"] == "assistant" else " ") for m in msgs)
        return tok(text).input_ids + ([tok.eos_token_id] if msgs[-1]["role"] == "assistant" else [])

    input_ids: list[int] = []
    loss_mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = ids(messages[:i], gen=True) if i else []
        upto = ids(messages[: i + 1], gen=False)
        if upto[: len(before)] != before or upto[: len(input_ids)] != input_ids:
            raise DataError("chat template renders a conversation prefix differently from the whole")
        loss_mask += [0] * (len(before) - len(input_ids)) + [1] * (len(upto) - len(before))
        input_ids = upto
    return {"input_ids": input_ids[:max_length], "loss_mask": loss_mask[:max_length]}


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from rayllm.models import load_tokenizer

    return load_tokenizer(path)


def tokenize_batch(batch: dict, tok_path: str, cfg_json: str) -> dict:
    """Ray Data map_batches function: JSON records -> input_ids/loss_mask columns."""
    cfg = SFTDataConfig.model_validate_json(cfg_json)
    tok = _tokenizer(tok_path)
    ids, masks = [], []
    for idx, rec in zip(batch["idx"], batch["record"]):
        row = tokenize_chat(tok, to_messages(json.loads(rec), cfg, where=f"record {idx}"), cfg.max_length)
        ids.append(np.asarray(row["input_ids"], dtype=np.int32))
        masks.append(np.asarray(row["loss_mask"], dtype=np.int8))
    return {"idx": batch["idx"], "input_ids": ids, "loss_mask": masks}


def tokenized_rows(records: list[dict], tok_path: str | Path, cfg: SFTDataConfig) -> tuple[list[dict], int]:
    """Tokenize on Ray Data workers; returns rows in record order and how many were dropped
    because truncation left no response token to learn from."""
    import ray

    # Records travel as JSON strings: arbitrary nesting (chats) survives Arrow unchanged, and
    # `idx` names the record in errors and restores order after the parallel map.
    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage has its own
    items = [{"idx": i, "record": json.dumps(r)} for i, r in enumerate(records)]
    ds = ray.data.from_items(items).map_batches(
        tokenize_batch, fn_kwargs={"tok_path": str(tok_path), "cfg_json": cfg.model_dump_json()},
        batch_size=256, batch_format="numpy",
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["idx"]))
    rows = [{"input_ids": r["input_ids"].tolist(), "loss_mask": r["loss_mask"].tolist()} for r in rows]
    kept = [r for r in rows if sum(r["loss_mask"][1:]) > 0]
    return kept, len(rows) - len(kept)


def split(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * eval_fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
