"""Bundled tasks with a programmatic ground truth, so training effects are measured against truth.

`arithmetic`: "What is a + b?" with the exact answer; a response is correct iff its last integer
equals the true result. With the bundled BPE every number up to 99 is one token, so for a tiny
model this is a lookup table of ~20k facts: unseen facts cannot be inferred.

`sort`: "Sort: 7 3 9 8 7" -> "3 7 7 8 9", 4-8 digits (one token each, repeats allowed); a response
is correct iff its numbers are exactly the sorted list. Compositional: a small model can learn it
for lists it never saw, so the effect of RL on held-out prompts is measurable.
`sort_unique`: the same over distinct digits (the demo's task); `sort_noisy` and
`sort_unique_noisy`: their prompts with 35% near-miss responses, imperfect SFT data.
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


def sort_example(rng: random.Random, unique: bool = False) -> dict:
    k = rng.randint(4, 8)
    xs = rng.sample(range(10), k) if unique else [rng.randint(0, 9) for _ in range(k)]
    ys = sorted(xs)
    return {"prompt": "Sort: " + " ".join(map(str, xs)), "response": " ".join(map(str, ys)), "answer": ys}


def sort_task(n: int, seed: int = 0, unique: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [sort_example(rng, unique) for _ in range(n)]


def sort_unique_task(n: int, seed: int = 0) -> list[dict]:
    """`sort` over distinct digits (the demo's task): checking an answer needs no counting,
    only "sorted, and the same digits as the prompt", which a tiny reward model learns (0.995+
    held-out accuracy in the demo, against 0.94 on `sort`, where it could not tell miscounts).
    Distinct numbers 0-19 were too hard for the demo's budget (SFT greedy 0.10, RM 0.85)."""
    return sort_task(n, seed, unique=True)


def sort_score(response: str, record: dict) -> float:
    """1.0 if the response's numbers are exactly the sorted list, else 0.0."""
    return float([int(x) for x in re.findall(r"-?\d+", response)] == list(record["answer"]))


def sort_wrong_response(record: dict, rng: random.Random) -> str:
    """A near miss: two neighbours swapped, one number dropped or inserted, one changed, a
    miscount (one copy of a repeated number changed to a neighbouring value, re-sorted), or a
    *sorted* list with the wrong numbers (2-3 changed and re-sorted, or drawn at random).

    Drops and insertions are equally likely, so a reward model trained on these pairs cannot
    learn "longer is better" (with drops alone it did, and PPO exploited it at once); sorted
    lists with the wrong numbers keep it from learning "sorted is right" (without them, PPO
    found sorted lists of made-up digits that the reward model scored above the truth).
    Miscounts are the hardest to see: sorted, of the right length, every number drawn from the
    prompt. Without them a tiny reward model ranked "3 4 7 7 8 9 9" against the truth
    "3 4 7 7 7 8 9" at chance (60%), and PPO moved its greedy answers there."""
    ys = list(record["answer"])
    kind = rng.random()
    pairs = [i for i in range(len(ys) - 1) if ys[i] != ys[i + 1]]
    repeated = sorted({y for y in ys if ys.count(y) > 1})
    if kind < 0.2 and pairs:
        i = rng.choice(pairs)
        ys[i], ys[i + 1] = ys[i + 1], ys[i]
    elif kind < 0.325:
        del ys[rng.randrange(len(ys))]
    elif kind < 0.45:
        ys.insert(rng.randrange(len(ys) + 1), rng.randint(0, 9))
    elif kind < 0.55:
        i = rng.randrange(len(ys))
        ys[i] = rng.choice([d for d in range(10) if d != ys[i]])
    elif kind < 0.8:
        v = rng.choice(repeated) if repeated else rng.choice(ys)
        ys[ys.index(v)] = rng.choice([d for d in (v - 1, v + 1) if 0 <= d <= 9])
        ys.sort()
    elif kind < 0.9:
        for i in rng.sample(range(len(ys)), min(len(ys), rng.randint(2, 3))):
            ys[i] = rng.choice([d for d in range(10) if d != ys[i]])
        ys.sort()
    else:
        ys = sorted(rng.randint(0, 9) for _ in ys)
    if ys == list(record["answer"]):  # a re-sort or random draw can land on the truth
        ys = ys[:-1]
    return " ".join(map(str, ys))


def sort_noisy_task(n: int, seed: int = 0, noise: float = 0.35, unique: bool = False) -> list[dict]:
    """`sort` with imperfect demonstrations: a `noise` share of responses are near misses
    (sort_wrong_response), as careless human data would be; "answer" stays the true sorted list.
    A policy fine-tuned on it sorts, and also makes those mistakes; preferences can then fix
    what the demonstrations taught wrong (the demo's SFT data)."""
    rng = random.Random(seed + 7919)
    out = []
    for rec in sort_task(n, seed, unique):
        if rng.random() < noise:
            rec = {**rec, "response": sort_wrong_response(rec, rng)}
        out.append(rec)
    return out


def sort_unique_noisy_task(n: int, seed: int = 0, noise: float = 0.35) -> list[dict]:
    return sort_noisy_task(n, seed, noise, unique=True)


BUNDLED = {"arithmetic": arithmetic, "sort": sort_task, "sort_noisy": sort_noisy_task,
           "sort_unique": sort_unique_task, "sort_unique_noisy": sort_unique_noisy_task}
SCORERS = {"arithmetic": arithmetic_score, **{name: sort_score for name in BUNDLED if name.startswith("sort")}}
WRONG = {"arithmetic": arithmetic_wrong_response, "sort": sort_wrong_response, "sort_unique": sort_wrong_response}


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
