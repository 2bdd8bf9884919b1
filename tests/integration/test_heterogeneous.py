"""Speed-proportional work in a ModelGroup (docs/heterogeneous.md): a rank throttled k times
(it sleeps k - 1 times each micro-batch's busy time, inside its own process, as a slower device
would take) is measured and handed a share of each step in proportion to its speed, while every
step's global batch, its loss normalisation and so the update stay those of an even split."""
import pytest

from rayllm.config import GroupConfig
from rayllm.group import ModelGroup

pytestmark = pytest.mark.usefixtures("ray_cluster")

STEPS = 8
ROWS = 32  # 8 micro-batches of 4: a 2:1 speed ratio can be cut 5:3 (0.375) or, by rows, nearer 2:1


@pytest.fixture
def long_rows():
    """Rows of 96-160 tokens: long enough that a tiny model's compute grows with its tokens (at 10-40
    a micro-batch's fixed cost dominates, and tokens per second is no measure of a rank's speed)."""
    import random

    def make(n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            ids = [rng.randrange(10, 1000) for _ in range(rng.randint(96, 160))]
            rows.append({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (len(ids) - 5)})
        return rows

    return make


def _run(stage: int, tiny_path, random_rows, throttle: dict, balance: bool = True) -> tuple[list, list]:
    cfg = GroupConfig(num_ranks=2, zero_stage=stage, micro_batch_size=4,
                      elastic={"throttle": throttle, "balance": balance})
    g = ModelGroup("sft/policy", cfg, tiny_path)
    try:
        out = [g.train_step(random_rows(ROWS, seed=s)) for s in range(STEPS)]
        assert g.step == STEPS
        return [m["loss"] for m in out], out
    finally:
        g.shutdown()


@pytest.mark.parametrize("stage", [0, 2])
def test_rank_throttled_2x_gets_about_a_third_of_each_step_and_the_losses_equal_the_unthrottled_run(
        stage, tiny_path, long_rows):
    random_rows = long_rows
    even, _ = _run(stage, tiny_path, random_rows, {}, balance=False)
    losses, steps = _run(stage, tiny_path, random_rows, {1: 2.0})
    # Every step trained on the whole global batch: its target tokens all counted, on the two ranks.
    expected_tokens = [sum(sum(r["loss_mask"][1:]) for r in random_rows(ROWS, seed=s)) for s in range(STEPS)]
    assert [m["tokens"] for m in steps] == expected_tokens
    assert all(m["world_size"] == 2 for m in steps)
    # The first step is cut evenly (nothing measured yet); from the second on, the slow rank's share
    # of the tokens computed follows its measured speed, about 1/3 (micro-batch or row granularity).
    assert steps[0]["rank_shares"][1] == pytest.approx(0.5, abs=0.07)
    later = [m["rank_shares"][1] for m in steps[2:]]
    assert 0.2 <= sum(later) / len(later) <= 0.42 and all(0.12 <= s <= 0.45 for s in later), later
    speed = [m["rank_tokens_per_s"] for m in steps[2:]]
    assert all(s0 > 1.5 * s1 for s0, s1 in speed), speed  # rank 1 measured about 2x slower
    # The update does not depend on the split: below ZeRO-2 the same micro-batches (exact sums), at
    # ZeRO-2 other micro-batches of the same rows (equal to rounding): the world-size tolerance.
    assert losses == pytest.approx(even, abs=1e-5, rel=0)
