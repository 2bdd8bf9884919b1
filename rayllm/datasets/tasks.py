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


BUNDLED = {"arithmetic": arithmetic}


def bundled(name: str, n: int, seed: int = 0) -> list[dict]:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled task {name!r}; known: {sorted(BUNDLED)}")
    return BUNDLED[name](n, seed)
