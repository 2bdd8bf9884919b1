"""Bundled tasks with a programmatic ground truth, so training effects are measured against truth.

`arithmetic`: "What is a + b?" with the exact answer; a response is correct iff its last integer
equals the true result. With the bundled BPE every number up to 99 is one token, so for a tiny
model this is a lookup table of ~20k facts: unseen facts cannot be inferred.

`sort`: "Sort: 7 3 9 1 4" -> "1 3 4 7 9", 4-8 digits (one token each); a response is correct iff
its numbers are exactly the sorted list. Compositional: a small model can learn it for lists it
never saw, so the effect of RL on held-out prompts is measurable (the demo's task).
`sort_noisy`: the same prompts with 35% near-miss responses, the demo's imperfect SFT data.
"""
from __future__ import annotations

import random
import re

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_example(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    hi = 12 if op == "*" else 99
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return {
        "prompt": f"What is {a} {op} {b}?",
        "response": f"{a} {op} {b} = {_OPS[op](a, b)}",
        "answer": _OPS[op](a, b),
    }


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [arithmetic_example(rng) for _ in range(n)]


def arithmetic_correct(response: str, answer: int) -> bool:
    nums = re.findall(r"-?\d+", response)
    return bool(nums) and int(nums[-1]) == answer


def arithmetic_score(response: str, record: dict) -> float:
    """Ground truth of a response: 1.0 if it ends with the right answer, else 0.0."""
    return float(arithmetic_correct(response, int(record["answer"])))


def arithmetic_wrong_response(record: dict, rng: random.Random) -> str:
    """A plausible wrong answer: the right expression with a near-miss result (off by 1-10, a
    digit swap, or the wrong operation), the mistakes a small model makes."""
    a, op, b = record["prompt"].removeprefix("What is ").removesuffix("?").split()
    right = int(record["answer"])
    kind = rng.random()
    if kind < 0.6:
        wrong = right + rng.choice([-1, 1]) * rng.randint(1, 10)
    elif kind < 0.8 and len(str(abs(right))) > 1:
        digits = str(abs(right))
        wrong = int(("-" if right < 0 else "") + digits[::-1])
    else:
        other = "-" if op == "+" else "+"  # a product of two-digit numbers would be no near miss
        wrong = _OPS[other](int(a), int(b))
    if wrong == right:
        wrong = right + 1
    return f"{a} {op} {b} = {wrong}"


def sort_example(rng: random.Random) -> dict:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(4, 8))]
    ys = sorted(xs)
    return {"prompt": "Sort: " + " ".join(map(str, xs)), "response": " ".join(map(str, ys)), "answer": ys}


def sort_task(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [sort_example(rng) for _ in range(n)]


def sort_score(response: str, record: dict) -> float:
    """1.0 if the response's numbers are exactly the sorted list, else 0.0."""
    return float([int(x) for x in re.findall(r"-?\d+", response)] == list(record["answer"]))


def sort_wrong_response(record: dict, rng: random.Random) -> str:
    """A near miss: two neighbours swapped, one number dropped or inserted, one changed, or a
    *sorted* list with the wrong numbers (2-3 changed and re-sorted, or drawn at random).

    Drops and insertions are equally likely, so a reward model trained on these pairs cannot
    learn "longer is better" (with drops alone it did, and PPO exploited it at once); sorted
    lists with the wrong numbers keep it from learning "sorted is right" (without them, PPO
    found sorted lists of made-up digits that the reward model scored above the truth)."""
    ys = list(record["answer"])
    kind = rng.random()
    pairs = [i for i in range(len(ys) - 1) if ys[i] != ys[i + 1]]
    if kind < 0.25 and pairs:
        i = rng.choice(pairs)
        ys[i], ys[i + 1] = ys[i + 1], ys[i]
    elif kind < 0.4:
        del ys[rng.randrange(len(ys))]
    elif kind < 0.55:
        ys.insert(rng.randrange(len(ys) + 1), rng.randint(0, 9))
    elif kind < 0.7:
        i = rng.randrange(len(ys))
        ys[i] = rng.choice([d for d in range(10) if d != ys[i]])
    elif kind < 0.85:
        for i in rng.sample(range(len(ys)), min(len(ys), rng.randint(2, 3))):
            ys[i] = rng.choice([d for d in range(10) if d != ys[i]])
        ys.sort()
    else:
        ys = sorted(rng.randint(0, 9) for _ in ys)
    if ys == list(record["answer"]):  # a re-sort or random draw can land on the truth
        ys = ys[:-1]
    return " ".join(map(str, ys))


def sort_noisy_task(n: int, seed: int = 0, noise: float = 0.35) -> list[dict]:
    """`sort` with imperfect demonstrations: a `noise` share of responses are near misses
    (sort_wrong_response), as careless human data would be; "answer" stays the true sorted list.
    A policy fine-tuned on it sorts, and also makes those mistakes; preferences can then fix
    what the demonstrations taught wrong (the demo's SFT data)."""
    rng = random.Random(seed + 7919)
    out = []
    for rec in sort_task(n, seed):
        if rng.random() < noise:
            rec = {**rec, "response": sort_wrong_response(rec, rng)}
        out.append(rec)
    return out


BUNDLED = {"arithmetic": arithmetic, "sort": sort_task, "sort_noisy": sort_noisy_task}
SCORERS = {"arithmetic": arithmetic_score, "sort": sort_score, "sort_noisy": sort_score}
WRONG = {"arithmetic": arithmetic_wrong_response, "sort": sort_wrong_response}


def scorer(source: str, spec: str | None = None, what: str = "score_fn"):
    """The ground-truth checker fn(response, record) -> float for data from `source`: the hook
    `spec` ("module:function" or "file.py:function") when given, else the bundled task's own
    (None for other sources)."""
    if spec:
        from rayllm.hooks import load_hook

        return load_hook(spec, what)
    return SCORERS.get(source.split(":", 1)[1]) if source.startswith("bundled:") else None


def bundled(name: str, n: int, seed: int = 0) -> list[dict]:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled task {name!r}; known: {sorted(BUNDLED)}")
    return BUNDLED[name](n, seed)
