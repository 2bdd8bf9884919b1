"""Bundled tasks with a programmatic ground truth, so training effects are measured against truth.

`arithmetic`: "What is a + b?" with the exact answer; a response is correct iff its last integer
equals the true result.
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


BUNDLED = {"arithmetic": arithmetic}
SCORERS = {"arithmetic": arithmetic_score}
WRONG = {"arithmetic": arithmetic_wrong_response}


def bundled(name: str, n: int, seed: int = 0) -> list[dict]:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled task {name!r}; known: {sorted(BUNDLED)}")
    return BUNDLED[name](n, seed)
