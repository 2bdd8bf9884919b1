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
