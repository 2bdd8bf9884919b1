import pytest
import torch

from rayllm.group.batching import collate, count_loss_tokens, plan


def test_same_micro_batches_for_any_world_size(random_rows):
    rows = random_rows(16)
    one = plan(rows, 1, 4, pad_id=0)
    two = plan(rows, 2, 4, pad_id=0)
    flat = [mb for shard in two for mb in shard]
    assert len(one[0]) == 4 and [len(s) for s in two] == [2, 2]
    for a, b in zip(one[0], flat):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "loss_mask"))


def test_uneven_split_gets_zero_weight_fillers(random_rows):
    rows = random_rows(10)
    shards = plan(rows, 4, 2, pad_id=0)  # 5 micro-batches over 4 ranks -> 2 each, 3 fillers
    assert [len(s) for s in shards] == [2, 2, 1 + 1, 0 + 2]
    fillers = [mb for s in shards for mb in s if mb.get("filler")]
    assert len(fillers) == 3 and all(mb["loss_mask"].sum() == 0 for mb in fillers)
    real = [mb for s in shards for mb in s if not mb.get("filler")]
    assert sum(int(mb["loss_mask"][:, 1:].sum()) for mb in real) == count_loss_tokens(rows)


def test_collate_right_pads():
    mb = collate([{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4], "loss_mask": [1]}], pad_id=9)
    assert mb["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mb["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert mb["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_collate_packed_rows_keeps_positions_and_pads_as_a_new_document():
    mb = collate([{"input_ids": [1, 2, 3, 4], "position_ids": [0, 1, 0, 1], "loss_mask": [0, 1, 0, 1]},
                  {"input_ids": [5, 6], "position_ids": [0, 1], "loss_mask": [0, 1]}], pad_id=0)
    assert mb["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]


def _tokens(shard):
    return sum(int(mb["attention_mask"].sum()) for mb in shard if not mb.get("filler"))


def _tokens_only(*per_token_s):
    from rayllm.group.speed import RankCost

    return [RankCost(0.0, t) for t in per_token_s]


def test_costs_below_lockstep_hand_out_runs_of_the_same_micro_batches(random_rows):
    rows = random_rows(32)
    even = [mb for s in plan(rows, 1, 4, pad_id=0) for mb in s]
    shards = plan(rows, 2, 4, pad_id=0, costs=_tokens_only(1e-3, 2e-3), lockstep=False)
    flat = [mb for s in shards for mb in s]
    assert [len(s) for s in shards] in ([5, 3], [6, 2]) and not any(mb.get("filler") for mb in flat)
    for a, b in zip(even, flat):  # the very micro-batches of a one-rank run: exact sums
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])


def test_costs_in_lockstep_give_every_rank_the_same_count_and_tokens_near_its_speed_share(random_rows):
    rows = random_rows(32)
    shards = plan(rows, 2, 4, pad_id=0, costs=_tokens_only(1e-3, 3e-3), lockstep=True)
    assert len(shards[0]) == len(shards[1])  # ZeRO-2/3: the same number of backwards on every rank
    assert all(mb["input_ids"].shape[0] <= 4 for s in shards for mb in s)  # never above micro_batch_size
    share = _tokens(shards[1]) / (_tokens(shards[0]) + _tokens(shards[1]))
    assert abs(share - 0.25) < 0.05
    real = [mb for s in shards for mb in s if not mb.get("filler")]
    assert sum(int(mb["loss_mask"][:, 1:].sum()) for mb in real) == count_loss_tokens(rows)


def test_lockstep_adds_micro_batches_only_where_their_fixed_cost_pays(random_rows):
    from rayllm.group.speed import RankCost

    rows = random_rows(32)  # 8 micro-batches of 4: an even split runs 4 per rank
    free = plan(rows, 2, 4, pad_id=0, costs=[RankCost(0.0, 1e-3), RankCost(0.0, 4e-3)], lockstep=True)
    assert len(free[0]) > 4  # nothing per micro-batch: the fast rank takes more rows in more of them
    dear = plan(rows, 2, 4, pad_id=0, costs=[RankCost(10.0, 1e-3), RankCost(40.0, 4e-3)], lockstep=True)
    assert [len(s) for s in dear] == [4, 4]  # a micro-batch costs more than any rows it could move


def _predicted(shards, costs):
    return max(c.seconds(len(s), _tokens(s)) for s, c in zip(shards, costs))


@pytest.mark.parametrize("a_slow", [0.0, 0.02, 0.2])
def test_lockstep_plan_is_as_fast_as_the_best_split_and_count_found_by_brute_force(random_rows, a_slow):
    from rayllm.group.speed import RankCost

    rows = random_rows(24)
    costs = [RankCost(a_slow / 3, 1e-4), RankCost(a_slow, 3e-4)]
    got = _predicted(plan(rows, 2, 4, pad_id=0, costs=costs, lockstep=True), costs)
    lens = [len(r["input_ids"]) for r in rows]
    best = min(max(costs[0].seconds(c, sum(lens[:cut])), costs[1].seconds(c, sum(lens[cut:])))
               for c in range(3, 7) for cut in range(1, 24) if cut <= 4 * c and 24 - cut <= 4 * c)
    assert got == pytest.approx(best, rel=1e-6)


def test_lockstep_costs_keep_pairs_together_and_fillers_are_two_tokens(random_rows):
    rows = random_rows(16)
    shards = plan(rows, 2, 4, pad_id=0, costs=_tokens_only(7e-3, 1e-3), lockstep=True, unit=2)
    assert all(mb["input_ids"].shape[0] % 2 == 0 for s in shards for mb in s)
    fillers = [mb for s in shards for mb in s if mb.get("filler")]
    assert fillers and all(f["input_ids"].shape == (2, 2) and f["loss_mask"].sum() == 0 for f in fillers)


def test_speed_book_fits_seconds_per_micro_batch_per_token_and_the_first_micro_batch_excess():
    from rayllm.group.speed import SpeedBook

    book = SpeedBook(ema=0.5, deadband=1.25)
    fixed, per_token, first = 0.02, 1e-4, 0.3
    book.add("train_step", 0, [(500, first + fixed + per_token * 500)] + [(x, fixed + per_token * x) for x in (4, 200, 600)])
    book.add("train_step", 1, [(300, 3 * (first + fixed + per_token * 300))]
             + [(x, 3 * (fixed + per_token * x)) for x in (100, 200, 600)])
    fast, slow = book.costs("train_step", [0, 1])
    assert fast == pytest.approx((fixed, per_token, first))
    assert slow == pytest.approx((3 * fixed, 3 * per_token, 3 * first))


def test_speed_book_falls_back_to_a_tokens_only_rate_where_micro_batches_are_alike():
    from rayllm.group.speed import SpeedBook

    book = SpeedBook(ema=0.5, deadband=1.25)
    book.add("train_step", 0, [(512, 0.09), (480, 0.05), (540, 0.06)])  # sizes within 6%: a would be noise
    book.add("train_step", 1, [(512, 0.3), (500, 0.2), (520, 0.2)])
    fast, slow = book.costs("train_step", [0, 1])
    assert fast.per_micro_batch_s == 0 and fast.per_token_s == pytest.approx((480 * 0.05 + 540 * 0.06) / (480**2 + 540**2))
    assert slow.per_micro_batch_s == 0 and slow.per_call_s > 0  # the first's excess is still counted


def test_speed_book_splits_evenly_inside_the_deadband_and_for_unmeasured_members():
    from rayllm.group.speed import SpeedBook

    book = SpeedBook(ema=0.5, deadband=1.25)
    assert book.costs("train_step", [0, 1]) is None  # nothing measured yet
    book.add("train_step", 0, [(1000, 1.0)])
    book.add("train_step", 1, [(1000, 1.1)])
    assert book.costs("train_step", [0, 1]) is None  # 1.1x: noise between alike ranks
    book.add("train_step", 1, [(1000, 3.0)])  # EMA of the moments: y = (1.1 + 3.0) / 2
    fast, slow = book.costs("train_step", [0, 1])
    assert slow.per_token_s / fast.per_token_s == pytest.approx(2.05)
    assert book.costs("logprobs", [0, 1]) == [fast, slow]  # train's stand in for a kind not yet measured
    assert book.costs("train_step", [0, 1, 2]) is None  # a member not yet measured (a joiner)
