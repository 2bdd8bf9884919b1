"""How a weight push is judged: an engine's teacher-forced log-probs on a fixed probe batch
against the trainer's for the same tokens (docs/weight_sync.md#calibration).

The judgement is the mean |delta log p| over the probe's tokens, with a looser bound on the
largest gap: the largest gap of two correct fp32 implementations grows with the logits as the
policy sharpens, while a bad push moves the mean by orders of magnitude.
"""
from __future__ import annotations

import math

import numpy as np


def probe_rows(vocab_size: int, rows: int, length: int) -> list[list[int]]:
    """The fixed probe batch: random token ids (the same every time) across the vocabulary."""
    rng = np.random.default_rng(12345)
    return rng.integers(3, vocab_size, size=(rows, length)).tolist()


def gap_stats(got: list, want: list[np.ndarray]) -> dict[str, float]:
    """Over every probe token: mean |delta log p|, the token probability error exp(mean |delta
    log p|) (NeMo-RL's alarm is 1.01), and the largest |delta log p|."""
    gap = np.abs(np.concatenate([np.asarray(x, dtype=np.float64) for x in got]) - np.concatenate(want))
    mean = float(np.mean(gap))
    return {"mean_gap": mean, "max_gap": float(np.max(gap)), "token_prob_error": math.exp(mean)}


def passes(st: dict[str, float], mean_tolerance: float, tolerance: float) -> bool:
    # `not x <= bound` fails a NaN too: written as a positive test of both bounds.
    return st["mean_gap"] <= mean_tolerance and st["max_gap"] <= tolerance


def describe(st: dict[str, float], mean_tolerance: float, tolerance: float) -> str:
    return (f"mean |delta| {st['mean_gap']:.3g} (tolerance {mean_tolerance:g}), largest {st['max_gap']:.3g} "
            f"(tolerance {tolerance:g}), token probability error {st['token_prob_error']:.6f}")
