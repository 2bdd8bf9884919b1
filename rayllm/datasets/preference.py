"""Preference pairs for the reward model: (prompt, chosen, rejected) -> two token rows.

Rows use the layout the PPO stage scores its rollouts with (rayllm.datasets.prompts): the chat
prompt ending in the assistant header, then the response and EOS. A reward model trained on any
other layout would be scoring text it never saw.
"""
from __future__ import annotations

import hashlib
import random

from rayllm.config import PreferenceDataConfig
from rayllm.datasets import tasks
from rayllm.datasets.prompts import encode_prompt, encode_response
from rayllm.datasets.sft import DataError, read_jsonl

__all__ = ["DataError", "flatten_pairs", "load_pairs", "pairs_from_samples", "split_pairs", "tokenize_pair"]


def load_pairs(cfg: PreferenceDataConfig, seed: int = 0) -> list[dict]:
    """Pairs as {"prompt", "chosen", "rejected", ...}; other fields of a record are kept.

    "bundled:<task>": the task's records, chosen = the correct response, rejected = a near-miss
    wrong one (`tasks.WRONG[task]`), drawn with a generator seeded by `seed`. Otherwise a JSONL
    file whose records carry the configured prompt/chosen/rejected fields, all strings.
    """
    if cfg.source.startswith("bundled:"):
        name = cfg.source.split(":", 1)[1]
        records = tasks.bundled(name, cfg.num_examples, seed)
        if name not in tasks.WRONG:
            raise DataError(f"bundled task {name!r} has no wrong-response generator for preference pairs; "
                            f"those that do: {sorted(tasks.WRONG)}")
        rng = random.Random(f"preference:{name}:{seed}")
        out = []
        for rec in records:
            extra = {k: v for k, v in rec.items() if k not in ("prompt", "response")}
            out.append({**extra, "prompt": rec["prompt"], "chosen": rec["response"],
                        "rejected": tasks.WRONG[name](rec, rng)})
        return out
    return _load_jsonl(cfg)


def _load_jsonl(cfg: PreferenceDataConfig) -> list[dict]:
    fields = {"prompt": cfg.prompt_field, "chosen": cfg.chosen_field, "rejected": cfg.rejected_field}
    expected = "string fields " + ", ".join(repr(f) for f in fields.values())
    pairs = []
    for where, rec in read_jsonl(cfg.source, expected):
        pair = {k: v for k, v in rec.items() if k not in fields.values()}
        for key, field in fields.items():
            if field not in rec:
                raise DataError(f"{where}: missing field {field!r} ({key}); has {sorted(rec)}")
            if not isinstance(rec[field], str):
                raise DataError(f"{where}: field {field!r} ({key}) must be a string, "
                                f"got {type(rec[field]).__name__}")
            pair[key] = rec[field]
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{cfg.source}: no records")
    return pairs


def pairs_from_samples(pairs: list[dict], samples: list[list[str]], score, max_per_prompt: int) -> tuple[list[dict], dict]:
    """On-policy pairs: for each pair record and the responses a policy sampled for its prompt,
    every distinct response that `score(response, record) < 0.5` calls wrong (at most
    `max_per_prompt`, in sampling order) is rejected against the record's chosen response.
    Returns (pairs, stats): the share of samples the checker passed, and how many pairs.

    Pairs carry "origin": "policy", so held-out accuracy can be split by where pairs came from."""
    out, n_samples, n_right = [], 0, 0
    for rec, texts in zip(pairs, samples, strict=True):
        seen = {rec["chosen"].strip()}
        wrong = []
        for t in texts:
            n_samples += 1
            if float(score(t, rec)) >= 0.5:
                n_right += 1
            elif t.strip() not in seen and len(wrong) < max_per_prompt:
                seen.add(t.strip())
                wrong.append(t)
        out += [{**rec, "rejected": t, "origin": "policy"} for t in wrong]
    return out, {"policy_sample_accuracy": n_right / max(1, n_samples), "policy_pairs": len(out)}


def tokenize_pair(tok, pair: dict, max_length: int) -> tuple[dict, dict]:
    """(chosen row, rejected row), each {"input_ids", "loss_mask"}.

    input_ids = encode_prompt(prompt) + encode_response(response), cut to `max_length` tokens by
    dropping tokens from the end: the prompt is kept from its start and the response loses its
    tail (EOS first). A prompt longer than `max_length` leaves no response token at all; then
    both rows are the same and the pair carries no preference (see `pair_is_informative`).
    `loss_mask` is all ones: the pairwise loss reads it only to tell real pairs from filler.
    """
    prompt = encode_prompt(tok, pair["prompt"])

    def row(response: str) -> dict:
        ids = (prompt + encode_response(tok, response))[:max_length]
        return {"input_ids": ids, "loss_mask": [1] * len(ids)}

    return row(pair["chosen"]), row(pair["rejected"])


def pair_is_informative(chosen: dict, rejected: dict) -> bool:
    """False when the two rows are identical (e.g. both truncated before they differ): no
    model can rank them, and training on them only pulls the loss towards log 2."""
    return chosen["input_ids"] != rejected["input_ids"]


def flatten_pairs(rows: list[tuple[dict, dict]]) -> list[dict]:
    """[(c0, r0), (c1, r1), ...] -> [c0, r0, c1, r1, ...], the order the pairwise loss expects."""
    return [row for pair in rows for row in pair]


def _prompt_key(prompt: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{prompt}".encode()).hexdigest()


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs, split by prompt: distinct prompts are ranked by a hash of
    (seed, prompt) and the first round(eval_fraction x #prompts) of them (at least one, never
    all) are held out with every pair that has them, so a prompt never lands on both sides.
    Deterministic, and independent of the order of `pairs`; each side keeps the input order."""
    prompts = sorted({p["prompt"] for p in pairs}, key=lambda s: _prompt_key(s, seed))
    if len(prompts) < 2:
        raise DataError(f"{len(pairs)} pair(s) with {len(prompts)} distinct prompt(s): a held-out split "
                        "needs at least 2 distinct prompts")
    n_eval = min(len(prompts) - 1, max(1, round(len(prompts) * eval_fraction)))
    held = set(prompts[:n_eval])
    return [p for p in pairs if p["prompt"] not in held], [p for p in pairs if p["prompt"] in held]
