"""How prompts and responses become token ids for the reward model and PPO, in one place: the
reward model must score exactly the token layout the policy generates (chat prompt with the
generation header, then the response ending in EOS)."""
from __future__ import annotations


def encode_prompt(tok, text: str) -> list[int]:
    """A user turn rendered by the chat template, ending with the assistant header."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def encode_response(tok, text: str) -> list[int]:
    """A finished response: its tokens, then EOS, as the policy emits it."""
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def load_prompts(cfg, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training records, held-out evaluation records) for PPO; each record has "prompt" and any
    other fields of its source (a bundled task's ground truth, e.g. "answer").

    Bundled tasks draw fresh examples for each split from seeds of their own, and evaluation
    records whose prompt also occurs among the training prompts are dropped, so the ground-truth
    evaluation is on prompts PPO never trained on."""
    import random

    from rayllm.datasets.sft import DataError, read_jsonl
    from rayllm.datasets.tasks import bundled

    if cfg.source.startswith("bundled:"):
        task = cfg.source.split(":", 1)[1]
        train = bundled(task, cfg.num_prompts, seed + 1001)
        held = bundled(task, 2 * cfg.eval_prompts, seed + 2002) if cfg.eval_prompts else []
    else:
        records = []
        for where, rec in read_jsonl(cfg.source, f"string field {cfg.prompt_field!r}"):
            if not isinstance(rec.get(cfg.prompt_field), str):
                raise DataError(f"{where}: no string field {cfg.prompt_field!r}")
            records.append({**rec, "prompt": rec[cfg.prompt_field]})
        if not records:
            raise DataError(f"{cfg.source}: no records")
        random.Random(seed).shuffle(records)
        n_eval = min(cfg.eval_prompts, len(records) // 2)
        held, train = records[:n_eval], records[n_eval:]
    seen = {r["prompt"] for r in train}
    held = [r for r in held if r["prompt"] not in seen][: cfg.eval_prompts]
    return train, held
