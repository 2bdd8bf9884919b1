"""A tiny policy whose sampled responses stop at EOS with a long tail of lengths, for the
realistic workload of bench/ppo_iteration.py (issue 16: responses of 20-128+ tokens).

A freshly initialised tiny model almost never samples EOS, so every response would run to the
token limit. This fine-tunes one on responses whose lengths follow a log-normal clipped to
[min_len, max_len] (median ~40 tokens), each ending in EOS: sampled at temperature 1 its
responses stop at spread lengths, as real RLHF responses do (tiny-8m, 64 HF samples: min 20,
quartiles 33 / 51 / 68, max 128, 3 cut at 128; 284 s to build on 2 cores). Built once and cached by its
arguments. A plain torch loop on one process, not rayllm's SFT stage: the benchmark's subject is
the PPO iteration, and the same weights must reach TRL's separate environment as a plain HF dir.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path


def length_policy(base: Path, out_root: Path, min_len: int = 20, max_len: int = 128, steps: int = 300,
                  seed: int = 0) -> Path:
    """A copy of the causal LM at `base`, fine-tuned so its responses stop at spread lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = hashlib.sha256(json.dumps([str(base), min_len, max_len, steps, seed]).encode()).hexdigest()[:12]
    out = out_root / f"length-policy-{key}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    from rayllm.datasets.prompts import encode_prompt
    from rayllm.datasets.tasks import arithmetic

    records = arithmetic(512, seed=seed + 7)
    words = [w for w in "the of and a to in is it that for on as with was he at by this".split()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        batch = []
        for r in rng.sample(records, 16):
            n = int(min(max_len, max(min_len, math.exp(rng.gauss(math.log(40), 0.6)))))
            text = " ".join(rng.choice(words) for _ in range(n))
            resp = tok(text, add_special_tokens=False)["input_ids"][:n - 1] + [tok.eos_token_id]
            prompt = encode_prompt(tok, r["prompt"])
            batch.append((prompt, resp))
        width = max(len(p) + len(q) for p, q in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, q) in enumerate(batch):
            row = p + q
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, len(p):len(row)] = torch.tensor(q)
            mask[i, :len(row)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
