"""The judgement of a weight push (rayllm.rollout.verify), on hand-made log-probs."""
import math

import numpy as np

from rayllm.rollout import verify


def test_probe_rows_are_the_same_every_time_and_avoid_the_special_ids():
    a, b = verify.probe_rows(100, 4, 8), verify.probe_rows(100, 4, 8)
    assert a == b and len(a) == 4 and all(len(r) == 8 for r in a)
    assert min(min(r) for r in a) >= 3 and max(max(r) for r in a) < 100


def test_gap_stats_are_the_mean_and_largest_absolute_gap_over_all_tokens():
    want = [np.array([-1.0, -2.0]), np.array([-3.0])]
    got = [[-1.1, -2.0], [-2.5]]
    st = verify.gap_stats(got, want)
    assert math.isclose(st["mean_gap"], 0.2) and math.isclose(st["max_gap"], 0.5)
    assert math.isclose(st["token_prob_error"], math.exp(0.2))


def test_a_push_passes_only_within_both_bounds_and_a_nan_fails():
    want = [np.array([-1.0, -2.0])]
    assert verify.passes(verify.gap_stats([[-1.0, -2.0]], want), 1e-3, 1e-2)
    assert not verify.passes(verify.gap_stats([[-1.005, -2.005]], want), 1e-3, 1e-2)  # mean over its bound
    assert not verify.passes({"mean_gap": 1e-4, "max_gap": 0.5}, 1e-3, 1e-2)  # one token far off
    assert not verify.passes(verify.gap_stats([[float("nan"), -2.0]], want), 1e-3, 1e-2)
