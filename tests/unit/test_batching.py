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


def test_shares_below_lockstep_hand_out_runs_of_the_same_micro_batches(random_rows):
    rows = random_rows(32)
    even = [mb for s in plan(rows, 1, 4, pad_id=0) for mb in s]
    shards = plan(rows, 2, 4, pad_id=0, shares=[2, 1], lockstep=False)
    flat = [mb for s in shards for mb in s]
    assert [len(s) for s in shards] in ([5, 3], [6, 2]) and not any(mb.get("filler") for mb in flat)
    for a, b in zip(even, flat):  # the very micro-batches of a one-rank run: exact sums
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])


def test_shares_in_lockstep_give_every_rank_the_same_count_and_tokens_near_each_share(random_rows):
    rows = random_rows(32)
    shards = plan(rows, 2, 4, pad_id=0, shares=[3, 1], lockstep=True)
    assert len(shards[0]) == len(shards[1])  # ZeRO-2/3: the same number of backwards on every rank
    assert all(mb["input_ids"].shape[0] <= 4 for s in shards for mb in s)  # never above micro_batch_size
    share = _tokens(shards[1]) / (_tokens(shards[0]) + _tokens(shards[1]))
    assert abs(share - 0.25) < 0.05
    real = [mb for s in shards for mb in s if not mb.get("filler")]
    assert sum(int(mb["loss_mask"][:, 1:].sum()) for mb in real) == count_loss_tokens(rows)


def test_lockstep_shares_keep_pairs_together_and_fillers_are_two_tokens(random_rows):
    rows = random_rows(16)
    shards = plan(rows, 2, 4, pad_id=0, shares=[1, 7], lockstep=True, unit=2)
    assert all(mb["input_ids"].shape[0] % 2 == 0 for s in shards for mb in s)
    fillers = [mb for s in shards for mb in s if mb.get("filler")]
    assert fillers and all(f["input_ids"].shape == (2, 2) and f["loss_mask"].sum() == 0 for f in fillers)


def test_speed_book_shares_follow_speed_outside_the_deadband_only():
    from rayllm.group.speed import SpeedBook

    book = SpeedBook(ema=0.5, deadband=1.25)
    assert book.shares("train_step", [0, 1]) is None  # nothing measured yet
    book.add("train_step", 0, 1000, 1.0)
    book.add("train_step", 1, 900, 1.0)
    assert book.shares("train_step", [0, 1]) is None  # 1.11x: noise between alike ranks
    book.add("train_step", 1, 200, 1.0)  # EMA: (900 + 200) / 2 = 550
    assert book.shares("train_step", [0, 1]) == pytest.approx([1000 / 1550, 550 / 1550])
    assert book.shares("logprobs", [0, 1]) == pytest.approx([1000 / 1550, 550 / 1550])  # train's stand in
    assert book.shares("train_step", [0, 1, 2]) is None  # a member not yet measured (a joiner)
